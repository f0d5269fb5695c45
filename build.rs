//! Build script of the `cloudrm` package: it only declares what reruns it. The CUDA
//! kernel sources (`kernels/cuda/*.cu`) are embedded by `kernels/build.rs`, the build
//! script of `cloudrm-kernels`, which owns them; neither ever fails for lack of CUDA.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
