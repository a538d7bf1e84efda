"""tf_keras (Keras 2) glue: TensorFlow decides what is saved and restored; the Rust core moves the bytes."""
