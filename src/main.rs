fn main() -> std::process::ExitCode {
    twinblk::cli::main()
}
