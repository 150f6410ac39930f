//! The DICOM edge against a plain DICOM push, on the same machine in the same run, with a
//! generated 500-instance CT study (512x512, 16-bit):
//!
//! - plain push: dcmtk `storescu` -> `storescp` (loopback, `TCP_NODELAY=1`, one `sync` after);
//! - send: `pacs-broker send` of the study's files to a running partner (de-identify, outbox,
//!   durable commits, mutual TLS, receiver verification and commit, signed receipt);
//! - ingest: `storescu` into hospital-a's listener, every C-STORE acknowledged only once
//!   durable (partner stopped, so only the ingest is measured), and the listener's peak RSS;
//! - two hops: `storescu` into hospital-a until all instances are in telerad-c's inbox, with the
//!   latency of each instance from hospital-a's acknowledgement (the moment storescu's verbose
//!   output reports its C-STORE response) to its arrival in telerad-c's inbox, matched through
//!   the InstanceNumber both files carry;
//! - send and ingest again with `[audit.syslog]` live forwarding to a real rsyslog over TLS on
//!   both sites (issue 13: auditing must not slow them by more than 5%), with the ratio.
//!
//! Each of plain push, send, ingest (with and without forwarding) and two hops is the best of
//! `DICOM_BENCH_REPEAT` runs (default 3), interleaved, so that a busy moment on a shared machine
//! does not fall on one variant only. The median of the runs is printed beside the best, and
//! the ratio of each round (each variant against the plain push of its own round, run one after
//! the other; for forwarding, with / without), with their median: on a machine shared with
//! other work the plain push itself varies by 2x or more from one minute to the next, and a
//! ratio of two runs minutes apart measures that, not the broker. Use `DICOM_BENCH_REPEAT=7` or
//! more for the 5 % question of forwarding. Beside the wall clock it prints the
//! CPU time (user + system) of every process of each forwarding and non-forwarding run, which a
//! machine shared with other work disturbs far less.
//!
//! Every run's sites and files stay on disk until the bench ends (its temporary folder goes
//! then; a 500-instance round keeps about 1.5 GB, more with two hops' two sites). Deleting
//! them between runs would bill the next run for it: on ext4 without a journal (this
//! workplace's disks), each new inode skips,
//! one by one, the inodes freed in the last one to six minutes (`recently_deleted` in the
//! kernel's inode allocator), and online `discard` trims the freed blocks while the next run
//! writes. Whichever variant creates the most files right after a deletion would pay most.
//! Beside the wall clock, the CPU time (user + system) of the measured processes over the
//! measured window is printed (median): the sending and receiving sides, nothing else (for two
//! hops: storescu and both nodes until the last instance arrived). Divided by the machine's
//! cores it is a floor: no run can be faster than that, however well its work overlaps, so a
//! target the floor is already past can only be met by doing less work, not by overlapping it
//! better. Over the same windows it prints the steal time of `/proc/stat`: CPU time the
//! hypervisor gave other guests while this machine's cores wanted to run. A run that lost much
//! of it was slowed by the host. A host that slows the cores without taking them (shared caches,
//! memory bandwidth) shows instead as more CPU seconds for the same work.
//!
//! The collector measures the node, not itself: a real SIEM runs on another machine, so here
//! rsyslogd runs at `nice -n 19` and writes its work files and the messages it receives to a
//! tmpfs (`/dev/shm` when present), not to the disk the nodes fsync to (a node's `syncfs` would
//! otherwise also flush the collector's dirty pages). The bench says which in its output.
//!
//! ```text
//! cargo bench --bench dicom_edge
//! DICOM_BENCH_AT_REST=off cargo bench --bench dicom_edge   # both sites without encryption at rest
//! DICOM_BENCH_INSTANCES=100 DICOM_BENCH_REPEAT=1 cargo bench --bench dicom_edge
//! DICOM_BENCH_ONLY=send,twohops cargo bench --bench dicom_edge   # some variants (and the plain push)
//! ```
//!
//! `DICOM_BENCH_ONLY` takes a comma-separated list of `send`, `ingest`, `syslog` (both
//! forwarding variants) and `twohops`; the plain push always runs, as every ratio needs it.
//!
//! Needs dcmtk (`storescu`, `storescp`), rsyslog with its TLS module (`rsyslog-gnutls`) and the
//! repository's certs-dev/ and policies/ (the sites are laid out by `pacs-broker demo`). A
//! benchmark, not a test: it prints the figures.

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pacs_broker::audit::config::SyslogConfig;
use pacs_broker::config::NodeConfig;
use pacs_broker::demo::{write_synthetic_ct, SyntheticPatient};

#[path = "../tests/common/rsyslog.rs"]
mod rsyslog;
use rsyslog::Collector;

const BIN: &str = env!("CARGO_BIN_EXE_pacs-broker");
const AGREEMENT: &str = "example-teleradiology";
const FLOW: &str = "ct-reads";

use rsyslog::free_port;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(addr: &str) {
    let start = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{addr} never opened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sync() {
    let _ = Command::new("sync").status();
}

/// Two demo sites under `dir`, hospital-a's listener on a fresh port, and with `siem` both
/// sites forward their audit entries live to that collector; returns their configs.
fn lay_out(
    dir: &Path,
    quiet_secs: u64,
    siem: Option<&Collector>,
) -> (PathBuf, PathBuf, NodeConfig, NodeConfig) {
    let out = Command::new(BIN)
        .args(["demo", "--slices", "1", "--size", "16", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "demo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = dir.join("hospital-a").join("node.toml");
    let c = dir.join("telerad-c").join("node.toml");
    let mut cfg_a = NodeConfig::load(&a).unwrap();
    let mut cfg_c = NodeConfig::load(&c).unwrap();
    // `DICOM_BENCH_AT_REST=off`: measure without encryption at rest ([storage] encrypt_at_rest).
    if std::env::var("DICOM_BENCH_AT_REST").is_ok_and(|v| v == "off") {
        cfg_a.storage.encrypt_at_rest = false;
        cfg_c.storage.encrypt_at_rest = false;
        std::fs::write(&c, cfg_c.to_toml()).unwrap();
    }
    let d = cfg_a
        .dicom
        .as_mut()
        .expect("the demo's hospital-a has a listener");
    d.listen = format!("127.0.0.1:{}", free_port());
    d.study_quiet_secs = quiet_secs;
    if let Some(siem) = siem {
        for cfg in [&mut cfg_a, &mut cfg_c] {
            cfg.audit.syslog = Some(SyslogConfig {
                address: siem.address.clone(),
                ca: siem.ca.clone(),
                server_name: Some("localhost".into()),
                app_name: "pacs-broker".into(),
            });
        }
    }
    std::fs::write(&a, cfg_a.to_toml()).unwrap();
    std::fs::write(&c, cfg_c.to_toml()).unwrap();
    (a, c, cfg_a, cfg_c)
}

fn serve(config: &Path, cfg: &NodeConfig) -> Proc {
    let p = Proc(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config)
            .env("PACS_BROKER_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(&cfg.listen);
    if let Some(d) = &cfg.dicom {
        wait_port(&d.listen);
    }
    p
}

fn storescu(port: u16, called: &str, study: &Path) -> Duration {
    let start = Instant::now();
    let out = Command::new("storescu")
        .args(["-aet", "MODALITY", "-aec", called, "+sd", "127.0.0.1"])
        .arg(port.to_string())
        .arg(study)
        .env("TCP_NODELAY", "1")
        .output()
        .expect("storescu (dcmtk)");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "storescu: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn rate(n: usize, d: Duration) -> String {
    format!(
        "{:.3} s ({:.0} instances/s)",
        d.as_secs_f64(),
        n as f64 / d.as_secs_f64()
    )
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let n: usize = std::env::var("DICOM_BENCH_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let base = tempfile::tempdir().unwrap();
    let study = base.path().join("study");
    let files = write_synthetic_ct(&study, &SyntheticPatient::default(), n, 512).unwrap();
    let largest = files
        .iter()
        .map(|f| f.metadata().unwrap().len())
        .max()
        .unwrap_or(0);
    let bytes: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
    println!(
        "study: {n} CT instances, 512x512 16-bit, {:.1} MB",
        bytes as f64 / 1e6
    );
    sync();

    // Each figure is the best (and median) of `repeats` runs, the variants interleaved (plain
    // push, send, ingest, then the same with live syslog forwarding), so that a busy moment on a
    // shared machine does not land on one variant only.
    let repeats: usize = std::env::var("DICOM_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let only = std::env::var("DICOM_BENCH_ONLY").unwrap_or_default();
    let wanted = |v: &str| only.is_empty() || only.split(',').any(|o| o.trim() == v);
    // The collector off the measured disk (tmpfs) and at the lowest CPU priority.
    let shm = Path::new("/dev/shm");
    let siem_tmp = wanted("syslog").then(|| {
        if shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir_in(base.path()).unwrap()
        }
    });
    let siem = siem_tmp
        .as_ref()
        .map(|d| Collector::start_niced(d.path(), Some(COLLECTOR_NICE)));
    let mut runs = Runs::default();
    let mut rss = 0;
    for r in 0..repeats {
        let run = base.path().join(format!("run-{r}"));
        let (took, cpu, stolen) = plain_push(&run.join("storescp"), &study);
        runs.plain.push(took);
        runs.plain_measured_cpu.push(cpu);
        runs.plain_steal.push(stolen);
        // With and without forwarding back to back, in alternating order (a run can leave
        // writeback behind for the next one), so each round gives a fair ratio.
        let fwd_first = r % 2 == 1;
        if wanted("send") || siem.is_some() {
            let fwd = |runs: &mut Runs| {
                if let Some(siem) = &siem {
                    let ((took, _, _), cpu) =
                        with_cpu(|| run_send(&run.join("send-siem"), &study, Some(siem)));
                    runs.send_fwd.push(took);
                    runs.send_fwd_cpu.push(cpu);
                }
            };
            if fwd_first {
                fwd(&mut runs);
            }
            let ((took, measured, stolen), cpu) =
                with_cpu(|| run_send(&run.join("send"), &study, None));
            runs.send.push(took);
            runs.send_measured_cpu.push(measured);
            runs.send_steal.push(stolen);
            runs.send_cpu.push(cpu);
            if !fwd_first {
                fwd(&mut runs);
            }
        }
        if wanted("ingest") || siem.is_some() {
            let fwd = |runs: &mut Runs| {
                if let Some(siem) = &siem {
                    let ((took, _, _, _), cpu) =
                        with_cpu(|| run_ingest(&run.join("ingest-siem"), &study, Some(siem)));
                    runs.ingest_fwd.push(took);
                    runs.ingest_fwd_cpu.push(cpu);
                }
            };
            if fwd_first {
                fwd(&mut runs);
            }
            let ((took, peak, measured, stolen), cpu) =
                with_cpu(|| run_ingest(&run.join("ingest"), &study, None));
            runs.ingest.push(took);
            runs.ingest_measured_cpu.push(measured);
            runs.ingest_steal.push(stolen);
            runs.ingest_cpu.push(cpu);
            rss = rss.max(peak);
            if !fwd_first {
                fwd(&mut runs);
            }
        }
        if wanted("twohops") {
            runs.two_hops.push(two_hops(&run, &study, n));
        }
        // The round's sites stay until the bench ends (see the module doc: deleting them
        // between runs would bill the next run for it).
    }
    let plain = best(&runs.plain).expect("at least one run");
    println!("(best and median of {repeats} runs each, interleaved)");
    println!(
        "plain push   storescu -> storescp + sync: {}  (median {:.3} s)",
        rate(n, plain),
        median_secs(&runs.plain)
    );
    if let Some(send) = best(&runs.send) {
        println!(
            "send         pacs-broker send to a running partner: {}  = {:.2}x the plain push  (median {:.3} s; per round {})",
            rate(n, send),
            send.as_secs_f64() / plain.as_secs_f64(),
            median_secs(&runs.send),
            per_round(&runs.send, &runs.plain, 2),
        );
    }
    if let Some(ingest) = best(&runs.ingest) {
        println!(
            "ingest       storescu -> hospital-a (durable acks): {}  = {:.2}x storescp's throughput  (median {:.3} s; per round {})",
            rate(n, ingest),
            plain.as_secs_f64() / ingest.as_secs_f64(),
            median_secs(&runs.ingest),
            per_round(&runs.plain, &runs.ingest, 2),
        );
        println!(
            "peak RSS     of hospital-a while ingesting: {:.1} MiB (bound: 64 MiB + 2 x {:.2} MiB)",
            rss as f64 / 1024.0,
            largest as f64 / 1048576.0
        );
    }
    let mut cpu = format!(
        "plain push {:.2} s (storescu + storescp)",
        median_secs(&runs.plain_measured_cpu)
    );
    for (name, v, who) in [
        ("send", &runs.send_measured_cpu, "send + partner"),
        ("ingest", &runs.ingest_measured_cpu, "storescu + hospital-a"),
    ] {
        if !v.is_empty() {
            cpu += &format!(", {name} {:.2} s ({who})", median_secs(v));
        }
    }
    println!("CPU          user + system of the measured processes, median: {cpu}");
    let plain_median = median_secs(&runs.plain);
    let mut floors = Vec::new();
    if !runs.send_measured_cpu.is_empty() {
        let f = median_secs(&runs.send_measured_cpu) / cores();
        floors.push(format!(
            "send {f:.3} s = {:.2}x the median plain push",
            f / plain_median
        ));
    }
    if !runs.ingest_measured_cpu.is_empty() {
        let f = median_secs(&runs.ingest_measured_cpu) / cores();
        floors.push(format!(
            "ingest {f:.3} s = at most {:.2}x storescp's median throughput",
            plain_median / f
        ));
    }
    if !floors.is_empty() {
        println!(
            "floor        median CPU time of the measured processes over the {} cores (no run can be faster, however well it overlaps): {}",
            cores(),
            floors.join(", ")
        );
    }
    let mut stolen = Vec::new();
    for (name, v) in [
        ("plain push", &runs.plain_steal),
        ("send", &runs.send_steal),
        ("ingest", &runs.ingest_steal),
    ] {
        if let Some(max) = v.iter().max() {
            stolen.push(format!(
                "{name} {:.2} s (most {:.2} s)",
                median_secs(v),
                max.as_secs_f64()
            ));
        }
    }
    println!(
        "steal        CPU time the host gave to other guests while these cores wanted it (/proc/stat), median per run: {}; a run that lost much was slowed by the host, not by its own work",
        stolen.join(", ")
    );
    if let Some(siem) = &siem {
        report_forwarding(siem, &runs);
    }
    drop(siem);
    drop(siem_tmp);

    if !runs.two_hops.is_empty() {
        report_two_hops(&runs, n, plain);
    }
}

/// The cores this machine gives the bench (its processes share them).
fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

/// The ratio `a / b` of each round and their median, with `decimals` decimals, e.g.
/// "1.21 1.35 1.18 (median 1.21x)".
fn per_round(a: &[Duration], b: &[Duration], decimals: usize) -> String {
    let ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(a, b)| a.as_secs_f64() / b.as_secs_f64().max(1e-3))
        .collect();
    let each: Vec<String> = ratios.iter().map(|r| format!("{r:.decimals$}")).collect();
    format!("{} (median {:.decimals$}x)", each.join(" "), median(ratios))
}

/// rsyslogd's CPU priority in the bench: the collector stands for a SIEM on another machine.
const COLLECTOR_NICE: i32 = 19;

/// The time of every run of each variant, in run order (round r of each is index r).
#[derive(Default)]
struct Runs {
    plain: Vec<Duration>,
    send: Vec<Duration>,
    ingest: Vec<Duration>,
    send_fwd: Vec<Duration>,
    ingest_fwd: Vec<Duration>,
    /// CPU time (user + system) of the measured processes over the measured window only
    /// (storescu + storescp; send + the partner; storescu + hospital-a), per run.
    plain_measured_cpu: Vec<Duration>,
    send_measured_cpu: Vec<Duration>,
    ingest_measured_cpu: Vec<Duration>,
    /// The host's steal time over the same windows ([`steal`]), per run.
    plain_steal: Vec<Duration>,
    send_steal: Vec<Duration>,
    ingest_steal: Vec<Duration>,
    /// CPU time (user + system) of every process of each run, same order as the times above.
    send_cpu: Vec<Duration>,
    ingest_cpu: Vec<Duration>,
    send_fwd_cpu: Vec<Duration>,
    ingest_fwd_cpu: Vec<Duration>,
    two_hops: Vec<TwoHops>,
}

/// CPU time (user + system) of this process's children that have ended and been waited for
/// (`/proc/self/stat` cutime + cstime). A run's difference is the CPU its processes used — the
/// demo laying out the sites, the nodes, `send` or `storescu` — which, unlike the wall clock,
/// barely moves when other work shares the machine.
fn children_cpu() -> Duration {
    stat_cpu("/proc/self/stat", 13)
}

/// CPU time (user + system) a running process has used so far (`/proc/<pid>/stat` utime +
/// stime).
fn proc_cpu(pid: u32) -> Duration {
    stat_cpu(&format!("/proc/{pid}/stat"), 11)
}

/// The sum of the two clock-tick fields (10 ms each) at `first` and `first + 1` of a
/// `/proc/.../stat` file, counted after the command name (which may hold spaces); zero when the
/// file cannot be read.
fn stat_cpu(path: &str, first: usize) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let ticks: u64 = after
        .split_whitespace()
        .skip(first)
        .take(2)
        .map(|x| x.parse::<u64>().unwrap_or(0))
        .sum();
    Duration::from_millis(ticks * 10)
}

/// The CPU time (user + system) of the measured processes only, over the measured window: the
/// running `servers` and the processes `client` runs, not the demo that laid out the sites nor
/// a node's start. Also the time the host took from this machine's cores over that window
/// ([`steal`]).
fn measured_cpu<T>(servers: &[u32], client: impl FnOnce() -> T) -> (T, Duration, Duration) {
    let servers_cpu = || servers.iter().map(|&pid| proc_cpu(pid)).sum::<Duration>();
    let (before, stolen) = (servers_cpu(), steal());
    let (out, client_cpu) = with_cpu(client);
    let cpu = servers_cpu().saturating_sub(before) + client_cpu;
    (out, cpu, steal().saturating_sub(stolen))
}

/// CPU time the hypervisor gave other guests while this machine's cores wanted to run, summed
/// over the cores (`/proc/stat`, steal; zero where the kernel does not count it). On a shared
/// virtual machine a run that lost much of it was slowed by the host, not by its own work.
fn steal() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .and_then(|l| l.split_whitespace().nth(8))
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// `run`'s result and the CPU time its processes used.
fn with_cpu<T>(run: impl FnOnce() -> T) -> (T, Duration) {
    let before = children_cpu();
    let out = run();
    (out, children_cpu().saturating_sub(before))
}

fn best(runs: &[Duration]) -> Option<Duration> {
    runs.iter().min().copied()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    match xs.len() {
        0 => f64::NAN,
        l if l % 2 == 1 => xs[l / 2],
        l => (xs[l / 2 - 1] + xs[l / 2]) / 2.0,
    }
}

fn median_secs(runs: &[Duration]) -> f64 {
    median(runs.iter().map(Duration::as_secs_f64).collect())
}

/// The forwarding variants against the same variant without forwarding: ratio of the bests,
/// ratio of the medians, and the ratio of each round (with / without, run back to back).
fn report_forwarding(siem: &Collector, runs: &Runs) {
    // Give the forwarders a moment to deliver the last entries, then count what arrived.
    std::thread::sleep(Duration::from_millis(500));
    let forwarded = rsyslog::received(&siem.out).len();
    let variants = [
        ("send+syslog ", "send", &runs.send_fwd, &runs.send),
        ("ingest+syslog", "ingest", &runs.ingest_fwd, &runs.ingest),
        (
            "  cpu send+syslog ",
            "send",
            &runs.send_fwd_cpu,
            &runs.send_cpu,
        ),
        (
            "  cpu ingest+syslog",
            "ingest",
            &runs.ingest_fwd_cpu,
            &runs.ingest_cpu,
        ),
    ];
    println!(
        "[audit.syslog] live forwarding over TLS to a real rsyslog (nice {COLLECTOR_NICE}, writing to {}) on both sites:",
        siem.out.parent().map(|p| p.display().to_string()).unwrap_or_default()
    );
    println!("  (\"cpu\": CPU seconds of all processes of a run — site layout, nodes, send/storescu — less sensitive to a busy machine than the wall clock)");
    for (label, name, with, without) in variants {
        let (Some(bw), Some(bo)) = (best(with), best(without)) else {
            continue;
        };
        println!(
            "{label} best {:.3} s = {:.3}x {name} without; median {:.3} s = {:.3}x; per round {}",
            bw.as_secs_f64(),
            bw.as_secs_f64() / bo.as_secs_f64().max(1e-3),
            median_secs(with),
            median_secs(with) / median_secs(without).max(1e-3),
            per_round(with, without, 3),
        );
    }
    let forwarding_runs = runs.send_fwd.len() + runs.ingest_fwd.len();
    println!(
        "forwarded    {forwarded} audit entries reached rsyslog from {forwarding_runs} runs with forwarding (about {:.0} per run, each site's whole log: per study and association, none per instance)",
        forwarded as f64 / forwarding_runs.max(1) as f64
    );
    assert!(forwarded > 0, "no audit entry reached rsyslog");
}

/// dcmtk storescu -> storescp into `out`, then one sync.
fn plain_push(out: &Path, study: &Path) -> (Duration, Duration, Duration) {
    std::fs::create_dir_all(out).unwrap();
    let port = free_port();
    let scp = Proc(
        Command::new("storescp")
            .args(["-od"])
            .arg(out)
            .arg(port.to_string())
            .env("TCP_NODELAY", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("storescp (dcmtk)"),
    );
    wait_port(&format!("127.0.0.1:{port}"));
    sync();
    let start = Instant::now();
    let ((), cpu, stolen) = measured_cpu(&[scp.0.id()], || {
        storescu(port, "ANY-SCP", study);
    });
    sync();
    let took = start.elapsed();
    drop(scp);
    (took, cpu, stolen)
}

/// `pacs-broker send` of the study's files from hospital-a to a running telerad-c.
fn run_send(dir: &Path, study: &Path, siem: Option<&Collector>) -> (Duration, Duration, Duration) {
    let (a, c, _, cfg_c) = lay_out(dir, 2, siem);
    let partner = serve(&c, &cfg_c);
    sync();
    let start = Instant::now();
    let (out, cpu, stolen) = measured_cpu(&[partner.0.id()], || {
        Command::new(BIN)
            .args(["send", "--config"])
            .arg(&a)
            .args(["--agreement", AGREEMENT, "--flow", FLOW])
            .arg(study)
            .output()
            .unwrap()
    });
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "send: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(partner);
    (took, cpu, stolen)
}

/// storescu into hospital-a's listener (durable acks), its partner stopped so that only the
/// ingest is measured; the time and hospital-a's peak RSS (KiB).
fn run_ingest(
    dir: &Path,
    study: &Path,
    siem: Option<&Collector>,
) -> (Duration, u64, Duration, Duration) {
    let (a, _, cfg_a, _) = lay_out(dir, 3600, siem);
    let node = serve(&a, &cfg_a);
    sync();
    let (took, cpu, stolen) = measured_cpu(&[node.0.id()], || {
        storescu(listen_port(&cfg_a), "HOSP_A_BROKER", study)
    });
    let rss = peak_rss_kib(node.0.id());
    drop(node);
    (took, rss, cpu, stolen)
}

fn listen_port(cfg: &NodeConfig) -> u16 {
    cfg.dicom
        .as_ref()
        .expect("a DICOM listener")
        .listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port in [dicom] listen")
}

/// The InstanceNumber of a DICOM file (kept by de-identification): how an instance at the
/// partner is matched with the file storescu sent.
fn instance_number(path: &Path) -> Option<i64> {
    let obj = dicom_object::OpenFileOptions::new()
        .read_until(dicom_dictionary_std::tags::PIXEL_DATA)
        .open_file(path)
        .ok()?;
    obj.element(dicom_dictionary_std::tags::INSTANCE_NUMBER)
        .ok()?
        .to_int::<i64>()
        .ok()
}

/// storescu -v into `port`, with the moment each file's C-STORE response (success) arrived,
/// read from its verbose output line by line as it runs: (file, acknowledged at) in send order,
/// and how long storescu took.
fn storescu_acks(
    port: u16,
    called: &str,
    study: &Path,
    start: Instant,
) -> (Vec<(PathBuf, Duration)>, Duration) {
    use std::io::BufRead;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec storescu -v -aet MODALITY -aec {called} +sd 127.0.0.1 {port} \"$0\" 2>&1"
        ))
        .arg(study)
        .env("TCP_NODELAY", "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("storescu (dcmtk)");
    let mut acks = Vec::new();
    let mut sending: Option<PathBuf> = None;
    for line in std::io::BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        if let Some(f) = line.split("Sending file: ").nth(1) {
            sending = Some(PathBuf::from(f.trim()));
        } else if line.contains("Received Store Response (Success)") {
            if let Some(f) = sending.take() {
                acks.push((f, start.elapsed()));
            }
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "storescu failed");
    (acks, start.elapsed())
}

/// One two-hops run: when all instances were at the partner, when storescu was done, how many
/// arrived, the latency of each (ms, sorted) and the first acknowledged instance's (from its
/// ack, and from storescu's start).
struct TwoHops {
    all_there: Duration,
    ingest: Duration,
    /// CPU time (user + system) of storescu and both nodes until all had arrived.
    cpu: Duration,
    /// The host's steal time over the same window ([`steal`]).
    stolen: Duration,
    arrived: usize,
    latencies: Vec<f64>,
    first_after_ack: Duration,
    first_at: Duration,
}

/// storescu into hospital-a until every instance is in telerad-c's inbox, with per-instance
/// latency from the origin's acknowledgement (the C-STORE response storescu received) to the
/// instance's arrival in the partner's inbox (matched through its InstanceNumber).
fn two_hops(base: &Path, study: &Path, n: usize) -> TwoHops {
    let dir = base.join("two-hops");
    let (a, c, cfg_a, cfg_c) = lay_out(&dir, 2, None);
    let node_c = serve(&c, &cfg_c);
    let node_a = serve(&a, &cfg_a);
    let port = listen_port(&cfg_a);
    let inbox = cfg_c.data_dir.join("store").join("inbox");
    sync();
    let start = Instant::now();
    // The inbox is watched with inotify, not polled: a 2 ms poll of the whole inbox took about
    // 0.7 CPU-s of the two cores the nodes need. Watches are in place before storescu starts,
    // and the files already there (the demo's own study) do not count.
    let mut watch = InboxWatch::new(&inbox);
    let watcher = std::thread::spawn(move || {
        let mut arrived: HashMap<PathBuf, Duration> = HashMap::new();
        while arrived.len() < n && start.elapsed() < Duration::from_secs(300) {
            let new = watch.next_files();
            if new.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let now = start.elapsed();
            for path in new {
                arrived.entry(path).or_insert(now);
            }
        }
        (arrived, start.elapsed())
    });
    // Storescu and both nodes, until the last instance arrived.
    let (((acks, ingest), (arrived, all_there)), cpu, stolen) =
        measured_cpu(&[node_a.0.id(), node_c.0.id()], || {
            let sent = storescu_acks(port, "HOSP_A_BROKER", study, start);
            (sent, watcher.join().unwrap())
        });
    // Match: the partner's file and the sent file carry the same InstanceNumber.
    let acked: HashMap<i64, Duration> = acks
        .iter()
        .filter_map(|(f, at)| instance_number(f).map(|i| (i, *at)))
        .collect();
    let mut matched: Vec<(Duration, Duration)> = arrived
        .iter()
        .filter_map(|(p, at)| {
            let ack = acked.get(&instance_number(p)?)?;
            Some((*ack, *at))
        })
        .collect();
    matched.sort();
    let mut latencies: Vec<f64> = matched
        .iter()
        .map(|(ack, at)| at.saturating_sub(*ack).as_secs_f64() * 1000.0)
        .collect();
    latencies.sort_by(|x, y| x.partial_cmp(y).unwrap());
    // The first instance acknowledged: when it was acknowledged, and when it reached the partner.
    let (first_ack, first) = matched.first().copied().unwrap_or_default();
    TwoHops {
        all_there,
        ingest,
        cpu,
        stolen,
        arrived: arrived.len(),
        latencies,
        first_after_ack: first.saturating_sub(first_ack),
        first_at: first,
    }
}

/// Two hops against the plain push: the best run and its ratio to the best plain push, the
/// median, the ratio of each round to its own plain push; the latencies of all runs together,
/// and the slowest first image of any run.
fn report_two_hops(runs: &Runs, n: usize, plain: Duration) {
    let times: Vec<Duration> = runs.two_hops.iter().map(|t| t.all_there).collect();
    let Some(b) = runs.two_hops.iter().min_by_key(|t| t.all_there) else {
        return;
    };
    let mut latencies: Vec<f64> = runs
        .two_hops
        .iter()
        .flat_map(|t| t.latencies.iter().copied())
        .collect();
    latencies.sort_by(|x, y| x.total_cmp(y));
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let fewest = runs.two_hops.iter().map(|t| t.arrived).min().unwrap_or(0);
    let first = runs
        .two_hops
        .iter()
        .max_by_key(|t| t.first_after_ack)
        .expect("a run");
    println!(
        "two hops     storescu -> hospital-a -> telerad-c inbox: {} (storescu done after {:.3} s); at least {fewest} of {n} arrived in every run  = {:.2}x the plain push  (median {:.3} s; per round {})",
        rate(b.arrived, b.all_there),
        b.ingest.as_secs_f64(),
        b.all_there.as_secs_f64() / plain.as_secs_f64(),
        median_secs(&times),
        per_round(&times, &runs.plain, 2),
    );
    let cpu: Vec<Duration> = runs.two_hops.iter().map(|t| t.cpu).collect();
    let stolen: Vec<Duration> = runs.two_hops.iter().map(|t| t.stolen).collect();
    let floor = median_secs(&cpu) / cores();
    println!(
        "             CPU (storescu + both nodes until all arrived), median: {:.2} s; floor over the {} cores: {floor:.3} s = {:.2}x the median plain push; steal median {:.2} s (most {:.2} s)",
        median_secs(&cpu),
        cores(),
        floor / median_secs(&runs.plain),
        median_secs(&stolen),
        stolen.iter().max().copied().unwrap_or_default().as_secs_f64()
    );
    println!(
        "latency      origin ack (storescu's C-STORE response) -> partner inbox, {} instances of {} runs matched by InstanceNumber: median {:.0} ms, p99 {:.0} ms; first image at the partner at most {:.0} ms after its ack in any run ({:.0} ms after storescu started)",
        latencies.len(),
        runs.two_hops.len(),
        pct(0.5),
        pct(0.99),
        first.first_after_ack.as_secs_f64() * 1000.0,
        first.first_at.as_secs_f64() * 1000.0
    );
}

/// New `.dcm` files (not hidden) anywhere under a folder, as inotify reports them: a file renamed
/// into a watched folder or created there; a new subfolder is watched and scanned at once.
struct InboxWatch {
    fd: std::os::fd::OwnedFd,
    dirs: HashMap<i32, PathBuf>,
    found: Vec<PathBuf>,
}

impl InboxWatch {
    fn new(root: &Path) -> InboxWatch {
        use rustix::fs::inotify::{init, CreateFlags};
        let fd = init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).expect("inotify");
        let mut w = InboxWatch {
            fd,
            dirs: HashMap::new(),
            found: Vec::new(),
        };
        std::fs::create_dir_all(root).unwrap();
        w.watch_tree(root);
        w.found.clear(); // what is there before the run does not count
        w
    }

    fn is_instance(p: &Path) -> bool {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        name.ends_with(".dcm") && !name.starts_with('.')
    }

    /// Watches `dir` and every folder under it, noting the instance files already there.
    fn watch_tree(&mut self, dir: &Path) {
        use rustix::fs::inotify::{add_watch, WatchFlags};
        for e in walkdir::WalkDir::new(dir).into_iter().flatten() {
            if e.file_type().is_dir() {
                let flags = WatchFlags::CREATE | WatchFlags::MOVED_TO | WatchFlags::ONLYDIR;
                if let Ok(wd) = add_watch(&self.fd, e.path(), flags) {
                    self.dirs.insert(wd, e.path().to_path_buf());
                }
            } else if Self::is_instance(e.path()) {
                self.found.push(e.into_path());
            }
        }
    }

    /// The instance files that appeared since the last call (empty when nothing happened).
    fn next_files(&mut self) -> Vec<PathBuf> {
        use rustix::fs::inotify::{ReadFlags, Reader};
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 16384];
        let mut new_dirs = Vec::new();
        {
            let mut events = Reader::new(&self.fd, &mut buf);
            while let Ok(ev) = events.next() {
                let (Some(dir), Some(name)) = (self.dirs.get(&ev.wd()), ev.file_name()) else {
                    continue;
                };
                let path = dir.join(name.to_string_lossy().as_ref());
                if ev.events().contains(ReadFlags::ISDIR) {
                    new_dirs.push(path);
                } else if Self::is_instance(&path) {
                    self.found.push(path);
                }
            }
        }
        for d in new_dirs {
            self.watch_tree(&d);
        }
        std::mem::take(&mut self.found)
    }
}
