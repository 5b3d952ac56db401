// mimalloc: the decision path allocates many small JSON values per request,
// and glibc malloc was a quarter of the request threads' CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    casf_verifier::cli::run()
}
