//! Scalar reference kernels, one file per op family.
