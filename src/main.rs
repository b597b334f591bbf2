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
