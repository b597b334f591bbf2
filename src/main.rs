use std::process::ExitCode;

fn main() -> ExitCode {
    match lit_claire::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

// Training allocates and frees large tensors every step; mimalloc keeps freed pages
// for reuse instead of returning them to the kernel (glibc's mmap threshold makes every
// large buffer a fresh, page-faulting mapping).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
