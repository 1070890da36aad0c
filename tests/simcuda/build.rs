fn main() {
    // Loaded as libcuda.so.1; -Bsymbolic keeps the library's own references (the addresses that
    // cuGetProcAddress hands out, internal calls) bound to itself even under LD_PRELOAD.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-Bsymbolic");
    println!("cargo:rerun-if-changed=build.rs");
}
