"""tf_keras (Keras 2) glue: TensorFlow decides what is saved and restored; the Rust core moves the bytes."""


def custom_objects_in_scope(custom_objects) -> dict:
    """`custom_objects` with those registered and in scope, as tf_keras' loaders merge them."""
    from tf_keras.src.saving import object_registration

    return {
        **(custom_objects or {}),
        **object_registration._THREAD_LOCAL_CUSTOM_OBJECTS.__dict__,
        **object_registration._GLOBAL_CUSTOM_OBJECTS,
    }
