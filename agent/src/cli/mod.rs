//! Command line: `insite-agent run | status | syscalls | connections | queries | limits |
//! alerts | map`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

mod alerts;
mod limits;

pub use alerts::AlertsAction;
pub use limits::LimitsAction;

use crate::{
    config,
    control::{
        client,
        db::{QueriesRequest, QueriesView, Sort},
        net::{human_bytes, ConnectionsRequest, ConnectionsView, MapRequest, MapView},
        protocol::{Request, StatusRequest},
        status::{StatusView, Window},
        syscalls::{
            SyscallRow, SyscallTraceView, SyscallsRequest, SyscallsView, TraceDuration,
            TraceSyscallsRequest,
        },
    },
    daemon, logging,
    store::db::System,
    untrusted::Printable,
};

#[derive(Debug, Parser)]
#[command(
    name = "insite-agent",
    version,
    about = "InsiteChart host agent: eBPF performance monitoring"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (as root).
    Run {
        /// Config file (TOML). Default: /etc/insite-agent/config.toml; a missing default file
        /// means built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Prometheus endpoint address, overriding metrics.listen.
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Control socket path, overriding control.socket.
        #[arg(long)]
        control_socket: Option<PathBuf>,
    },
    /// Show the running agent's state: probes, config, event and drop rates.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = config::DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
    },
    /// Top syscalls by count and by p99 latency, with recent slow calls.
    Syscalls {
        /// Window to report on (1s..60s).
        #[arg(long, default_value = "10s")]
        window: String,
        /// Rows per table.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// Attach the hooks for this long (e.g. 30s; sampled mode attaches them only part of
        /// the time), wait, then report on that time (at most its last 60s).
        #[arg(long, value_name = "DURATION")]
        trace: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = config::DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
    },
    /// TCP connection edges: who talks to whom, connect times, failures, bytes.
    Connections {
        /// Window to report on (1s..60s).
        #[arg(long, default_value = "60s")]
        window: String,
        /// Edges to show, busiest first (1..10000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Edges to skip first (the next page: --offset 100).
        #[arg(long, default_value_t = 0)]
        offset: usize,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = config::DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
    },
    /// Rate limits the kernel enforces: list them, change them live, see who is dropped.
    Limits {
        #[command(subcommand)]
        action: Option<LimitsAction>,
        #[arg(long, global = true)]
        json: bool,
        #[arg(long, global = true, default_value = config::DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
    },
    /// Alerts from the Prometheus rules the agent evaluates: live alerts, their history.
    Alerts {
        #[command(subcommand)]
        action: Option<AlertsAction>,
        #[arg(long, global = true)]
        json: bool,
        #[arg(long, global = true, default_value = config::DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
    },
    /// The dependency map: services -> endpoints, clients -> local endpoints.
    Map {
        /// Window to report on (1s..60s).
        #[arg(long, default_value = "60s")]
        window: String,
        /// Edges to draw, busiest first (1..10000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Edges to skip first.
        #[arg(long, default_value_t = 0)]
        offset: usize,
        #[arg(long, conflicts_with = "dot")]
        json: bool,
        /// Graphviz dot (render with `dot -Tsvg`).
        #[arg(long)]
        dot: bool,
        #[arg(long, default_value = config::DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
    },
    /// Top normalized queries of every PostgreSQL, MySQL and Redis on the host: count, errors,
    /// p50, p99 and total time; then the recent slow queries.
    Queries {
        /// Only this system: postgresql, mysql or redis.
        #[arg(long)]
        system: Option<String>,
        /// Window to report on (1s..60s).
        #[arg(long, default_value = "60s")]
        window: String,
        /// Order by p99 latency, count, or total time.
        #[arg(long, default_value = "total", value_parser = ["p99", "count", "total"])]
        sort: String,
        /// Rows (queries and slow queries each).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = config::DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
    },
}

const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn main() -> ExitCode {
    logging::ensure_std_fds();
    let cli = Cli::parse();
    let daemon = matches!(cli.command, Command::Run { .. });
    if !daemon {
        logging::quiet_on_closed_stdout();
    }
    // Held until exit: dropping it flushes the daemon's queued log lines.
    let _log = logging::init(daemon);
    let result = match cli.command {
        Command::Run {
            config,
            metrics_listen,
            control_socket,
        } => {
            return match daemon::run(daemon::RunArgs {
                config_explicit: config.is_some(),
                config_path: config.unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG_PATH)),
                overrides: daemon::Overrides {
                    metrics_listen,
                    control_socket,
                },
            }) {
                Ok(code) => code,
                Err(e) => {
                    report_error(&e);
                    ExitCode::FAILURE
                }
            };
        }
        Command::Status {
            json,
            control_socket,
        } => client_cmd(
            &control_socket,
            &Request::of(&StatusRequest {}),
            json,
            |v| serde_json::from_value::<StatusView>(v).map(|s| print_status(&s)),
        ),
        Command::Syscalls {
            window,
            limit,
            trace,
            json,
            control_socket,
        } => (|| {
            let window = match trace {
                Some(d) => trace_syscalls(&control_socket, &d)?,
                None => window,
            };
            client_cmd(
                &control_socket,
                &Request::of(&SyscallsRequest {
                    window: Some(Window::try_from(window).map_err(anyhow::Error::msg)?),
                    limit: Some(limit),
                }),
                json,
                |v| serde_json::from_value::<SyscallsView>(v).map(|s| print_syscalls(&s)),
            )
        })(),
        Command::Connections {
            window,
            limit,
            offset,
            json,
            control_socket,
        } => (|| {
            client_cmd(
                &control_socket,
                &Request::of(&ConnectionsRequest {
                    window: Some(Window::try_from(window).map_err(anyhow::Error::msg)?),
                    limit: Some(limit),
                    offset: Some(offset),
                }),
                json,
                |v| serde_json::from_value::<ConnectionsView>(v).map(|c| print_connections(&c)),
            )
        })(),
        Command::Queries {
            system,
            window,
            sort,
            limit,
            json,
            control_socket,
        } => (|| {
            let system = match system.as_deref() {
                None | Some("") | Some("all") => None,
                Some(s) => Some(System::parse(s).ok_or_else(|| {
                    anyhow::anyhow!("system {s:?}: must be postgresql, mysql or redis")
                })?),
            };
            client_cmd(
                &control_socket,
                &Request::of(&QueriesRequest {
                    window: Some(Window::try_from(window).map_err(anyhow::Error::msg)?),
                    system,
                    sort: Some(Sort::parse(&sort).map_err(anyhow::Error::msg)?),
                    limit: Some(limit),
                }),
                json,
                |v| serde_json::from_value::<QueriesView>(v).map(|q| print_queries(&q)),
            )
        })(),
        Command::Limits {
            action,
            json,
            control_socket,
        } => limits::limits(&control_socket, action.unwrap_or(LimitsAction::List), json),
        Command::Alerts {
            action,
            json,
            control_socket,
        } => alerts::alerts(&control_socket, action.unwrap_or(AlertsAction::List), json),
        Command::Map {
            window,
            limit,
            offset,
            json,
            dot,
            control_socket,
        } => (|| {
            client_cmd(
                &control_socket,
                &Request::of(&MapRequest(ConnectionsRequest {
                    window: Some(Window::try_from(window).map_err(anyhow::Error::msg)?),
                    limit: Some(limit),
                    offset: Some(offset),
                })),
                json,
                |v| {
                    serde_json::from_value::<MapView>(v).map(|m| {
                        if dot {
                            print!("{}", m.to_dot());
                        } else {
                            print_map(&m);
                        }
                    })
                },
            )
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report_error(&e);
            ExitCode::FAILURE
        }
    }
}

/// Prints the error with each cause once (even where a message already quotes its cause). A
/// broken stderr is ignored: `eprintln!` would panic.
fn report_error(e: &anyhow::Error) {
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "insite-agent: {}",
        crate::probes::error_chain(e.as_ref())
    );
}

/// Asks for a trace, waits for it to end (and for the agent's next ticks to read it), and
/// returns the window to report on.
fn trace_syscalls(socket: &std::path::Path, duration: &str) -> anyhow::Result<String> {
    let data = client::request(
        socket,
        &Request::of(&TraceSyscallsRequest {
            duration: TraceDuration::try_from(duration.to_string()).map_err(anyhow::Error::msg)?,
        }),
        CLIENT_TIMEOUT,
    )?;
    let t: SyscallTraceView = serde_json::from_value(data)?;
    let left = Duration::from_secs_f64(t.seconds_left.max(0.0));
    eprintln!(
        "tracing every syscall for {} ({} mode otherwise)...",
        humantime::format_duration(Duration::from_secs(left.as_secs())),
        t.mode
    );
    // Two ticks (or more) for the agent to read the last of it.
    let settle = Duration::from_millis(600);
    std::thread::sleep(left + settle);
    let secs = (left + settle).as_secs_f64().ceil().clamp(1.0, 60.0) as u64;
    Ok(format!("{secs}s"))
}

pub(crate) fn client_cmd(
    socket: &std::path::Path,
    req: &Request,
    json: bool,
    print: impl FnOnce(serde_json::Value) -> Result<(), serde_json::Error>,
) -> anyhow::Result<()> {
    let data = client::request(socket, req, CLIENT_TIMEOUT)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&data)?);
    } else {
        print(data)?;
    }
    Ok(())
}

fn print_status(s: &StatusView) {
    println!("insite-agent {} (pid {})", s.version, s.pid);
    println!(
        "  uptime        {}",
        humantime::format_duration(Duration::from_secs(s.uptime_seconds as u64))
    );
    println!("  config        {}", s.config_source);
    println!("  metrics       http://{}/metrics", s.metrics_listen);
    println!("  control       {}", s.control_socket);
    println!(
        "  tick          {} ms ({} ticks, last {:.2} ms)",
        s.tick_interval_ms, s.ticks, s.last_tick_ms
    );
    if !s.syscall_sampling.is_empty() {
        println!("  syscalls      {}", s.syscall_sampling);
    }
    println!("probes:");
    for p in &s.probes {
        let state = format!("{:?}", p.state).to_lowercase();
        print!("  {:<10} {:<9}", p.name, state);
        if let Some(a) = &p.attach {
            print!(" via {a}");
        }
        if let Some(e) = &p.error {
            print!("  ({e})");
        }
        println!();
        if !p.missed_runs.is_empty() {
            let total: u64 = p.missed_runs.values().sum();
            let which: Vec<String> = p
                .missed_runs
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(prog, n)| format!("{prog} {n}"))
                .collect();
            print!("  {:<10} missed runs {total}", "");
            if !which.is_empty() {
                print!(" ({})", which.join(", "));
            }
            println!();
        }
    }
    if !s.events.is_empty() {
        println!("events (last 10s):");
        for e in &s.events {
            println!(
                "  {:<14} {:>8.1}/s  total {:<8} dropped {:.1}/s (total {})",
                e.stream, e.per_second, e.total, e.dropped_per_second, e.dropped_total
            );
        }
    }
}

fn fmt_us(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(us) if us >= 1e6 => format!("{:.2}s", us / 1e6),
        Some(us) if us >= 1e3 => format!("{:.2}ms", us / 1e3),
        Some(us) => format!("{us:.1}us"),
    }
}

fn print_rows(title: &str, rows: &[SyscallRow]) {
    println!("{title}");
    println!(
        "  {:<20} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10}",
        "SYSCALL", "COUNT", "RATE/s", "ERRORS", "P50", "P90", "P99"
    );
    for r in rows {
        println!(
            "  {:<20} {:>10} {:>10.1} {:>8} {:>10} {:>10} {:>10}",
            r.syscall,
            r.count,
            r.per_second,
            r.errors,
            fmt_us(r.p50_us),
            fmt_us(r.p90_us),
            fmt_us(r.p99_us)
        );
    }
}

fn print_syscalls(v: &SyscallsView) {
    println!(
        "syscalls over the last {:.1}s: {} calls",
        v.window_seconds, v.total_calls
    );
    if v.mode == "sampled" && v.observed_seconds + 0.05 < v.window_seconds {
        println!(
            "  sampled mode: hooks attached {:.1}s of {:.1}s; counts are of that time, rates \
             estimate the host's (--trace 30s, or [syscalls] mode = \"full\", counts every call)",
            v.observed_seconds, v.window_seconds
        );
    }
    print_rows("top by count:", &v.by_count);
    print_rows("top by p99:", &v.by_p99);
    println!("recent slow calls (>= {} ms):", v.slow_threshold_ms);
    if v.slow_calls.is_empty() {
        println!("  none");
    }
    for c in &v.slow_calls {
        println!(
            "  {:<16} pid {:<7} tid {:<7} {:<18} {:>10} ret {:<6} {}",
            Printable(&c.comm),
            c.pid,
            c.tid,
            c.syscall,
            fmt_us(Some(c.duration_ns as f64 / 1e3)),
            c.ret,
            Printable(c.service.as_deref().or(c.cgroup.as_deref()).unwrap_or(""))
        );
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    fmt_us(v.map(|ms| ms * 1e3))
}

fn print_queries(q: &QueriesView) {
    println!(
        "Queries over the last {:.1}s{}: {} fingerprints, by {:?}",
        q.window_seconds,
        q.system
            .map(|s| format!(" ({})", s.as_str()))
            .unwrap_or_default(),
        q.fingerprints,
        q.sort
    );
    if q.events_dropped > 0
        || q.unmatched > 0
        || q.desyncs > 0
        || q.untimed > 0
        || q.lost > 0
        || q.bytes_not_decoded > 0
    {
        println!(
            "  warning: {} requests seen but not timed ({} beyond 64 in flight; see insite_db_requests_lost_total), {} framing losses, {} bytes not decoded, {} events dropped by the kernel, {} responses without their request",
            q.lost.max(q.untimed),
            q.untimed,
            q.desyncs,
            q.bytes_not_decoded,
            q.events_dropped,
            q.unmatched
        );
    }
    if q.tls_connections > 0 {
        println!(
            "  note: {} connections switched to TLS and are not decoded",
            q.tls_connections
        );
    }
    println!(
        "  {:<10} {:<6} {:>8} {:>6} {:>6} {:>9} {:>9} {:>10}  {:<22} QUERY",
        "SYSTEM", "ROLE", "COUNT", "ERR", "MISS", "P50", "P99", "TOTAL", "DESTINATION"
    );
    for r in &q.queries {
        println!(
            "  {:<10} {:<6} {:>8} {:>6} {:>6} {:>9} {:>9} {:>10}  {:<22} {}",
            r.system.as_str(),
            r.role.as_str(),
            r.count,
            r.errors,
            r.misses,
            fmt_ms(r.p50_ms),
            fmt_ms(r.p99_ms),
            fmt_ms(Some(r.total_ms)),
            Printable(&r.destination),
            one_line(&r.fingerprint, 100)
        );
    }
    if !q.slow.is_empty() {
        println!("Slow queries (most recent first):");
        for s in &q.slow {
            println!(
                "  {:>10}  {:<10} {:<6} {:<7} {}[{}] -> {}  {}",
                fmt_ms(Some(s.duration_ms)),
                s.system.as_str(),
                s.role.as_str(),
                format!("{:?}", s.outcome).to_lowercase(),
                Printable(&s.comm),
                s.pid,
                Printable(&s.destination),
                one_line(&s.text, 100)
            );
        }
    }
}

/// Control characters become spaces and long text is cut, so that one row stays one line.
fn one_line(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if crate::untrusted::needs_escape(c) && c != '\\' {
                ' '
            } else {
                c
            }
        })
        .take(max)
        .collect();
    if s.chars().count() > max {
        out.push_str("...");
    }
    out
}

fn print_connections(c: &ConnectionsView) {
    println!(
        "TCP connections over the last {:.1}s: {} edges, resets sent {} / received {}, retransmits {} (all sockets)",
        c.window_seconds,
        c.total_edges.max(c.edges.len()),
        c.resets_sent,
        c.resets_received,
        c.retransmits_all
    );
    if c.edges.len() < c.total_edges {
        println!(
            "  showing edges {}..{} of {} (busiest first; --limit, --offset)",
            c.offset + 1,
            c.offset + c.edges.len(),
            c.total_edges
        );
    }
    if c.kernel_edges_full > 0 || c.edges_overflowed > 0 {
        println!(
            "  warning: {} updates counted under `other` by the kernel (edge table full), {} folded into `other` (net.max_edges)",
            c.kernel_edges_full, c.edges_overflowed
        );
    }
    println!(
        "  {:<3} {:<24} {:<28} {:<16} {:>6} {:>6} {:>9} {:>9} {:>9} {:>10} {:>10} {:>6} {:>6}",
        "DIR",
        "SERVICE",
        "DESTINATION",
        "PEER",
        "CONN",
        "FAIL",
        "CONN P50",
        "CONN P99",
        "RTT P50",
        "SENT",
        "RECEIVED",
        "RETX",
        "OPEN"
    );
    for e in &c.edges {
        let dir = match e.direction {
            crate::store::net::Direction::Outbound => "out",
            crate::store::net::Direction::Inbound => "in",
        };
        println!(
            "  {:<3} {:<24} {:<28} {:<16} {:>6} {:>6} {:>9} {:>9} {:>9} {:>10} {:>10} {:>6} {:>6}",
            dir,
            Printable(&e.service),
            Printable(&e.destination),
            Printable(&e.peer),
            e.connections,
            e.failures,
            fmt_ms(e.connect_p50_ms),
            fmt_ms(e.connect_p99_ms),
            fmt_ms(e.rtt_p50_ms),
            human_bytes(e.bytes_sent),
            human_bytes(e.bytes_received),
            e.retransmits,
            e.active
        );
        if !e.failures_by_reason.is_empty() {
            let reasons: Vec<String> = e
                .failures_by_reason
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            println!("      failed: {}", reasons.join(", "));
        }
        if !e.processes.is_empty() {
            println!("      processes: {}", Printable(&e.processes.join(", ")));
        }
    }
}

fn print_map(m: &MapView) {
    println!("dependency map over the last {:.1}s:", m.window_seconds);
    let label = |id: &str| {
        let text = m.nodes.iter().find(|n| n.id == id).map_or_else(
            || id.to_string(),
            |n| match &n.served_by {
                Some(s) => format!("{} ({s})", n.label),
                None => n.label.clone(),
            },
        );
        Printable(&text).to_string()
    };
    for e in &m.edges {
        let s = &e.stats;
        println!(
            "  {} -> {}  {} conn, {} failed, connect p99 {}, {} out / {} in",
            label(&e.from),
            label(&e.to),
            s.connections,
            s.failures,
            fmt_ms(s.connect_p99_ms),
            human_bytes(s.bytes_sent),
            human_bytes(s.bytes_received)
        );
    }
}
