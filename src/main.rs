use std::process::ExitCode;

fn main() -> ExitCode {
    lit_claire::allocator::keep_freed_memory();
    match lit_claire::cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

// Training allocates and frees large tensors every step; mimalloc keeps freed pages
// for reuse (glibc's mmap threshold makes every large buffer a fresh, page-faulting
// mapping), and `keep_freed_memory` stops it handing them back to the kernel.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
