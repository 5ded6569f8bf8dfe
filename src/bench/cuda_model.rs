//! The `model` family on the GPU: whole models on the CUDA backend against `transformers` on
//! the same GPU (see [`super::model`] for the CPU family it mirrors).
