//! The `tine` binary: the full CLI serving the built-in reference apps.

mod reference;

fn main() -> std::process::ExitCode {
    tine::run::<reference::Reference>()
}
