//! The load generators (redis-benchmark, pgbench): running them with a deadline and reading
//! their results.

use super::*;

pub(crate) struct ToolOutput {
    pub(crate) ok: bool,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs one client process to the end (killed after `timeout`), its output in files under
/// `dir`: no reader threads compete with the measured run.
pub(crate) fn run_tool(cmd: &mut Command, dir: &Path, timeout: Duration) -> Result<ToolOutput> {
    let what = crate::util::describe(cmd);
    let out_path = dir.join("tool.stdout");
    let err_path = dir.join("tool.stderr");
    let out = std::fs::File::create(&out_path)
        .with_context(|| format!("creating {}", out_path.display()))?;
    let err = std::fs::File::create(&err_path)
        .with_context(|| format!("creating {}", err_path.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
        {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| {
        std::fs::read(p)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .with_context(|| format!("reading {}", p.display()))
    };
    Ok(ToolOutput {
        ok: status.success(),
        stdout: read(&out_path)?,
        stderr: read(&err_path)?,
    })
}

/// One run of `w`; `ours` is the agent this bench started for it, if any.
pub(crate) fn run_workload(
    fx: &Fixture,
    w: &Workload,
    secs: u32,
    ours: Option<u32>,
) -> Result<Run> {
    let mut foreign = crate::util::foreign_tracers(ours);
    let (mut cmd, timeout) = match w.kind {
        Kind::Redis { pipeline } => {
            let mut cmd = Command::new(REDIS_BENCHMARK);
            cmd.args(["-h", "127.0.0.1", "-p", &fx.redis.port.to_string()])
                .args(["-t", "set,get", "-n", &w.redis_n.to_string()])
                .args(["-c", &REDIS_CLIENTS.to_string()]);
            if pipeline > 1 {
                cmd.args(["-P", &pipeline.to_string()]);
            }
            // Sized to take `secs`; four times that is clearly wrong.
            (cmd, Duration::from_secs(u64::from(secs) * 4) + TOOL_SLACK)
        }
        Kind::Pg { mode } => {
            let mut cmd = fx.pgbench_cmd();
            cmd.args(["-S", "-c", &PG_CLIENTS.to_string()])
                .args(["-j", &PG_THREADS.to_string(), "-T", &secs.to_string()])
                .args(["-M", mode]);
            (cmd, Duration::from_secs(u64::from(secs)) + TOOL_SLACK)
        }
    };
    let out = run_tool(&mut cmd, &fx.dir.0, timeout)?;
    let what = crate::util::describe(&cmd);
    if !out.ok {
        bail!("{what} failed:\n{}\n{}", out.stderr, out.stdout);
    }
    let mut run = match w.kind {
        Kind::Redis { .. } => parse_redis_benchmark(&out.stdout),
        Kind::Pg { mode } => parse_pgbench(&out.stdout, mode),
    }
    .with_context(|| format!("reading the output of {what}:\n{}", out.stdout))?;
    foreign.extend(crate::util::foreign_tracers(ours));
    foreign.sort();
    foreign.dedup();
    run.foreign = foreign;
    Ok(run)
}

/// redis-benchmark's default report: per test "====== SET ======", "  N requests completed in
/// S seconds" and "  throughput summary: R requests per second" (progress lines end in '\r').
pub(crate) fn parse_redis_benchmark(out: &str) -> Result<Run> {
    let mut test: Option<String> = None;
    let mut done = BTreeMap::new();
    let mut rates: BTreeMap<String, f64> = BTreeMap::new();
    for line in out.split(['\r', '\n']).map(str::trim) {
        if let Some(t) = line
            .strip_prefix("======")
            .and_then(|l| l.strip_suffix("======"))
        {
            test = Some(t.trim().to_ascii_uppercase());
        } else if let Some(n) = line.strip_suffix(" seconds").and_then(|l| {
            l.split_once(" requests completed in ")
                .and_then(|(n, _)| n.trim().parse::<u64>().ok())
        }) {
            let t = test.clone().context("a result before its test's header")?;
            done.insert(t, n);
        } else if let Some(r) = line
            .strip_prefix("throughput summary:")
            .and_then(|l| l.trim().strip_suffix("requests per second"))
        {
            let t = test.clone().context("a result before its test's header")?;
            rates.insert(t, r.trim().parse::<f64>().context("throughput")?);
        }
    }
    if done.len() != 2 || rates.len() != 2 || done.keys().ne(rates.keys()) {
        bail!("expected completed requests and throughput for GET and SET");
    }
    // Requests of both tests over the time both took.
    let total: u64 = done.values().sum();
    let time: f64 = done
        .iter()
        .map(|(t, n)| *n as f64 / rates.get(t).copied().unwrap_or(f64::NAN))
        .sum();
    Ok(Run {
        rate: total as f64 / time,
        done,
        failed: 0,
        foreign: Vec::new(),
    })
}

/// pgbench's report: "query mode: M", "number of transactions actually processed: N",
/// "number of failed transactions: F (...)", "tps = R (without initial connection time)".
pub(crate) fn parse_pgbench(out: &str, mode: &str) -> Result<Run> {
    let field = |key: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(str::trim)
            .with_context(|| format!("no {key:?}"))
    };
    let seen_mode = field("query mode:")?;
    if seen_mode != mode {
        bail!("pgbench ran in query mode {seen_mode}, not {mode}");
    }
    let processed: u64 = field("number of transactions actually processed:")?
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .context("processed transactions")?;
    let failed: u64 = field("number of failed transactions:")
        .ok()
        .and_then(|f| f.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let tps: f64 = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tps = "))
        .find(|l| l.contains("without initial connection time"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("no tps (without initial connection time)")?;
    Ok(Run {
        rate: tps,
        done: BTreeMap::from([("SELECT".to_string(), processed)]),
        failed,
        foreign: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------
