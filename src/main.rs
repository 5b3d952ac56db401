fn main() -> std::process::ExitCode {
    casf_verifier::cli::run()
}
