//! Scalar reference kernels, one file per op family, f32 compute. These are the test
//! oracle for every fast path; they favour obviousness over speed.

pub mod attention;
pub mod attention_paged;
pub mod embedding;
pub mod heads;
pub mod init;
pub mod matmul;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;
