//! The `nearspan` binary: parse arguments, call the library, print errors once.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = nearspan::cli::Cli::parse();
    let stdout = std::io::stdout();
    match nearspan::cli::run(args, &mut stdout.lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nearspan: {}", describe(&err));
            ExitCode::from(2)
        }
    }
}

/// Makes glibc's malloc reuse freed memory instead of handing it back to the kernel.
///
/// By default glibc serves every allocation over 32 MiB with a fresh `mmap` and unmaps it
/// on free, and trims freed memory off the top of its heaps. Candle allocates a new tensor
/// for every op, and a training step allocates the 47 MB word-embedding gradient and
/// AdamW's temporaries of the same size a dozen times: each one then page-faults in and
/// zeroes 11 000 fresh pages, which was half the time of the AdamW step (0.6 s of 1.9 s
/// per step of 32 x 24 tokens). With these two thresholds raised (1 GiB, 2 GiB) the pages
/// stay mapped and are reused; the cost is that the process keeps its peak heap size.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::os::raw::c_int, value: std::os::raw::c_int) -> std::os::raw::c_int;
        }
        const M_TRIM_THRESHOLD: std::os::raw::c_int = -1;
        const M_MMAP_THRESHOLD: std::os::raw::c_int = -3;
        // SAFETY: mallopt only sets malloc parameters; called before any other thread starts.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 1 << 30);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

/// `nearspan query ... | head` closing the pipe early is not an error.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// The error and its causes, joined by ": ", skipping a cause whose text the message
/// already contains (library errors often quote their source in their own message).
fn describe(err: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}
