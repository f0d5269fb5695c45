//! Sharded checkpoints (`model.safetensors.index.json`) and single-file checkpoints
//! behind one lookup by tensor name. (skeleton)
