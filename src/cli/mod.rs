//! The command line: `tine serve`, `tine check`, `tine ctl`. [`run`] gives any binary built on
//! tine this whole CLI for its own [`App`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::app::App;
use crate::config::{Config, ConfigError, Options};

#[derive(Parser)]
#[command(
    name = "tine",
    version,
    about = "A preforking, reforking application server",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the server (monitor, mold and workers).
    Serve(ServeArgs),
    /// Validate the configuration and exit, starting nothing.
    Check(ServeArgs),
    /// Send a command to a running server: status [--json], scale N, stop [--quick],
    /// kill-worker NR [--pid PID], refork, reload, reopen-logs, profile NR [--pid PID]
    /// [--seconds N] [--json] (a CPU flamegraph of worker NR, 10 s by default; prints the SVG's
    /// path once written; with --pid, only if worker NR is still that process).
    Ctl(CtlArgs),
    /// Watch a running server live: a row per process (requests/s, in flight, oldest request,
    /// CPU %, memory), restarts, accept queues, recent events. Keys: +/- scale by one, r refork,
    /// R reload, k kill the selected worker, p profile it for 10 s, arrows select, q quit.
    #[cfg(feature = "top")]
    Top(TopArgs),
}

#[cfg(feature = "top")]
#[derive(Args)]
struct TopArgs {
    /// The server's control socket.
    #[arg(long, env = "TINE_CONTROL_SOCKET", default_value = "tine.sock")]
    control_socket: PathBuf,
    /// Seconds between two refreshes (0.2 to 60).
    #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
    interval: f64,
}

#[cfg(feature = "top")]
fn parse_interval(text: &str) -> Result<f64, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if (0.2..=60.0).contains(&secs) {
        Ok(secs)
    } else {
        Err(format!("{secs} is outside 0.2..=60 seconds"))
    }
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file; every key is also a flag (kebab-case) and a TINE_* variable.
    #[arg(long, short = 'c', env = "TINE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    options: Options,
}

#[derive(Args)]
struct CtlArgs {
    /// The server's control socket.
    #[arg(long, env = "TINE_CONTROL_SOCKET", default_value = "tine.sock")]
    control_socket: PathBuf,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Gives every option of `serve` and `check` its `TINE_<KEY>` environment variable.
fn with_env_names(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|arg| {
        let id = arg.get_id().as_str();
        if arg.get_long().is_none() || id == "config" {
            return arg;
        }
        let name: &'static str = Box::leak(format!("TINE_{}", id.to_uppercase()).into_boxed_str());
        arg.env(name)
    })
}

fn load(args: ServeArgs) -> Result<Config, ConfigError> {
    let file = match &args.config {
        Some(path) => Options::from_file(path)?,
        None => Options::default(),
    };
    args.options.or(file).resolve()
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    crate::log::print_stderr(format_args!("tine: error: {message}"));
    ExitCode::from(2)
}

/// Prints `text` on stdout; a closed stdout (`tine ctl status | head -1`) is not an error worth a
/// panic, the reader has what it wanted.
fn print_stdout(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Runs the tine command line for app `A`: `serve`, `check`, `ctl` and `top`.
///
/// Call it first thing in `main`, before any thread exists (the monitor forks).
pub fn run<A: App>() -> ExitCode {
    crate::sys::exe::save();
    let cmd = Cli::command()
        .mut_subcommand("serve", with_env_names)
        .mut_subcommand("check", with_env_names);
    let cli = match cmd
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Cmd::Serve(args) => {
            let config = match load(args) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            if let Some(path) = &config.log_file {
                if let Err(e) = crate::log::open_log_file(path, config.run_as) {
                    return fail(format!(
                        "invalid value {:?} for `log_file`: {e}",
                        path.display().to_string()
                    ));
                }
            }
            if let Err(e) = crate::log::init(config.log_format, &config.log_level) {
                return fail(e);
            }
            crate::sys::proctitle::init();
            let logs_to_file = config.log_file.is_some();
            match crate::monitor::run::<A>(config) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    // One line on stderr. The log gets it too only when it goes to a file:
                    // logging to stderr as well showed every config error twice.
                    if logs_to_file {
                        tracing::error!("{e}");
                    }
                    crate::log::print_stderr(format_args!("tine: error: {e}"));
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Cmd::Check(args) => {
            let config = match load(args) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            if let Err(e) = A::check(&config) {
                return fail(format!("{e:#}"));
            }
            let limit = crate::monitor::nofile_hard_limit();
            if let Err(e) = crate::monitor::check_descriptor_budget(&config, limit) {
                return fail(e);
            }
            print_stdout(&format!(
                "configuration ok (handover version {})\n",
                crate::monitor::HANDOVER_VERSION
            ));
            ExitCode::SUCCESS
        }
        Cmd::Ctl(args) => {
            match crate::ctl::client::request(&args.control_socket, &args.command.join(" ")) {
                Ok(out) => {
                    print_stdout(&out);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    crate::log::print_stderr(format_args!("tine ctl: {e}"));
                    ExitCode::from(1)
                }
            }
        }
        #[cfg(feature = "top")]
        Cmd::Top(args) => {
            let options = crate::top::Options {
                control_socket: args.control_socket,
                interval: std::time::Duration::from_secs_f64(args.interval),
            };
            match crate::top::run(options) {
                Ok(crate::top::Ended::Quit) => ExitCode::SUCCESS,
                Ok(crate::top::Ended::Signal(signal)) => ExitCode::from((128 + signal) as u8),
                Err(e) => {
                    crate::log::print_stderr(format_args!("tine top: {e}"));
                    ExitCode::from(1)
                }
            }
        }
    }
}
