//! Terminal glue shared by the two binaries: argument parsing with one-line
//! errors, the progress bar, and turning a `run()` result into an exit code.
//! Everything else lives in `tv-core`.

use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::process::ExitCode;
use tv_core::progress::Progress;

/// Exit status for bad arguments (as clap uses).
pub const EXIT_USAGE: u8 = 2;
/// Exit status after SIGINT (128 + SIGINT, as shells report); SIGTERM
/// gives 143 (see [`tv_core::interrupt::exit_status`]).
pub const EXIT_INTERRUPTED: u8 = 130;

/// The whole `main` of a binary: parse `A`, call `run`, report the result.
pub fn main<A: Parser>(run: fn(A) -> anyhow::Result<()>) -> ExitCode {
    match parse_args::<A>() {
        Ok(args) => report(run(args)),
        Err(code) => code,
    }
}

/// Parses the command line; help and version print as usual, any other
/// parse error becomes one `error: ...` line and exit status 2.
pub fn parse_args<T: Parser>() -> Result<T, ExitCode> {
    match T::try_parse() {
        Ok(args) => Ok(args),
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            // clap spreads one error over several lines (the message, the
            // missing arguments, a usage line, a hint); keep the message and
            // the arguments, on one line.
            let text = e.render().to_string();
            let message: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            let message = message.join(" ");
            let message = message.trim_start_matches("error: ");
            eprintln!("error: {} (see --help)", name(message));
            Err(ExitCode::from(EXIT_USAGE))
        }
    }
}

/// Prints an error chain as one line and picks the exit status: 128 + the
/// signal's number when interrupted, else 1. Control characters in the
/// message (from tensor, shard or model names) are escaped, so it stays one
/// line and cannot drive the terminal.
pub fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", name(&format!("{e:#}")));
            let interrupted = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<tv_core::Error>(),
                    Some(tv_core::Error::Interrupted)
                )
            });
            if interrupted {
                ExitCode::from(tv_core::interrupt::exit_status())
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A byte-counting progress bar on stderr; hidden when stderr is not a
/// terminal or when `quiet`.
pub struct Bar(ProgressBar);

impl Bar {
    /// A bar labelled `message`.
    pub fn new(message: &'static str, quiet: bool) -> Self {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} ({binary_bytes_per_sec}, {eta} left)",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(message);
        Self(bar)
    }
}

impl Progress for Bar {
    fn begin(&self, total: u64) {
        self.0.set_length(total);
        self.0.set_position(0);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// Downloads the models among `specs` that are Hugging Face ids missing
/// from the local cache (one progress bar over all their bytes), unless
/// `no_download`, in which case a missing one is an error; prints a note
/// per model downloaded.
pub fn fetch_models(specs: &[String], no_download: bool, quiet: bool) -> anyhow::Result<()> {
    let access = if no_download {
        tv_core::hub::Access::CacheOnly
    } else {
        tv_core::hub::Access::Download
    };
    let bar = LazyBar {
        message: "downloading",
        quiet,
        bar: std::sync::OnceLock::new(),
    };
    let fetched = tv_core::hub::ensure(specs, access, &bar)?;
    notes(&fetched);
    Ok(())
}

/// A [`Bar`] drawn only once a pass begins, so a run that downloads
/// nothing shows none.
struct LazyBar {
    message: &'static str,
    quiet: bool,
    bar: std::sync::OnceLock<Bar>,
}

impl Progress for LazyBar {
    fn begin(&self, total: u64) {
        self.bar
            .get_or_init(|| Bar::new(self.message, self.quiet))
            .begin(total);
    }
    fn advance(&self, bytes: u64) {
        if let Some(bar) = self.bar.get() {
            bar.advance(bytes);
        }
    }
    fn finish(&self) {
        if let Some(bar) = self.bar.get() {
            bar.finish();
        }
    }
}

/// A name read from a file (tensor, shard, model), or any text holding
/// one, made safe to print: control characters escaped, one line.
pub fn name(text: &str) -> std::borrow::Cow<'_, str> {
    tv_core::error::escape_controls(text)
}

/// [`name`] of each of `names`, for tables.
pub fn names(names: &[String]) -> Vec<String> {
    names.iter().map(|n| name(n).into_owned()).collect()
}

/// Writes `text` to stdout, ignoring a closed pipe (`ta-merge ... | head`):
/// the human summary is optional, the files are the result. Every control
/// character but the line breaks of `text` is escaped; names embedded in a
/// line should go through [`name`] first, so a newline in one cannot split
/// the line.
pub fn say(text: impl std::fmt::Display) {
    use std::io::Write;
    let text = text.to_string();
    let safe: Vec<std::borrow::Cow<'_, str>> = text.split('\n').map(name).collect();
    let _ = write!(std::io::stdout().lock(), "{}", safe.join("\n"));
}

/// Prints one `note: ...` line on stderr per note (things the run did
/// besides its output, such as removing a dead run's leftovers).
pub fn notes(notes: &[String]) {
    for n in notes {
        eprintln!("note: {}", name(n));
    }
}

/// `println!` through [`say`].
#[macro_export]
macro_rules! sayln {
    ($($arg:tt)*) => { $crate::say(format!("{}\n", format_args!($($arg)*))) };
}
