//! The standard `process_*` metrics that Prometheus' own client libraries export (resident memory,
//! CPU seconds, start time, open file descriptors), read from /proc/self at scrape time, so that
//! the usual dashboards and a memory alert work on rekey as on any other exporter. Where /proc is
//! missing (not Linux) none are exported rather than zeros that would look like real readings.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// The kernel reports CPU times and the start time in /proc in USER_HZ ticks, which the kernel's
/// user ABI fixes at 100 on every architecture Linux ships for (sysconf(_SC_CLK_TCK) would need
/// `unsafe` or a libc call to say the same).
const USER_HZ: f64 = 100.0;

/// What /proc says of this process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessFigures {
    pub cpu_seconds: f64,
    pub start_time_seconds: f64,
    pub resident_memory_bytes: f64,
    pub virtual_memory_bytes: f64,
    pub open_fds: f64,
    pub max_fds: Option<f64>,
}

/// The fields of /proc/self/stat rekey exports: (user + system CPU seconds, start time in seconds
/// after boot, virtual memory bytes).
fn parse_stat(stat: &str) -> Option<(f64, f64, f64)> {
    // The command name (field 2) may hold spaces and parentheses: the fields that follow start
    // after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15, starttime 22, vsize 23.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    Some(((field(14)? + field(15)?) / USER_HZ, field(22)? / USER_HZ, field(23)?))
}

/// A "Name:   value kB" line of /proc/self/status, in bytes.
fn parse_status_kb(status: &str, name: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    let kb: f64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024.0)
}

/// The soft limit of "Max open files" in /proc/self/limits (None when unlimited).
fn parse_max_fds(limits: &str) -> Option<f64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// "btime" of /proc/stat: when the machine booted (Unix seconds).
fn parse_boot_time(stat: &str) -> Option<f64> {
    stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()
}

/// This process's figures, or None where /proc cannot be read.
pub fn read() -> Option<ProcessFigures> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let (cpu_seconds, started_after_boot, virtual_memory_bytes) = parse_stat(&read("/proc/self/stat")?)?;
    let boot = parse_boot_time(&read("/proc/stat")?)?;
    let status = read("/proc/self/status")?;
    Some(ProcessFigures {
        cpu_seconds,
        start_time_seconds: boot + started_after_boot,
        resident_memory_bytes: parse_status_kb(&status, "VmRSS:")?,
        virtual_memory_bytes,
        open_fds: std::fs::read_dir("/proc/self/fd").ok()?.count() as f64,
        max_fds: read("/proc/self/limits").as_deref().and_then(parse_max_fds),
    })
}

/// Registered on the registry's root: the names carry no `rekey_` prefix.
#[derive(Debug)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(p) = read() else { return Ok(()) };
        let help = "Total user and system CPU time spent in seconds";
        ConstCounter::new(p.cpu_seconds).encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            help,
            None,
            MetricType::Counter,
        )?)?;
        let gauges = [
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                Some(p.start_time_seconds),
            ),
            ("process_resident_memory_bytes", "Resident memory size in bytes", Some(p.resident_memory_bytes)),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes", Some(p.virtual_memory_bytes)),
            ("process_open_fds", "Number of open file descriptors", Some(p.open_fds)),
            ("process_max_fds", "Maximum number of open file descriptors", p.max_fds),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                ConstGauge::new(v).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read_field_by_field() {
        // A command name with a space and a parenthesis, as a process may be named.
        let stat = "4242 (re key) x) S 1 4242 4242 0 -1 4194560 2000 0 0 0 250 50 0 0 20 0 9 0 12345 104857600 \
                    3000 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat(stat), Some((3.0, 123.45, 104857600.0)));
        assert_eq!(parse_status_kb("Name:\trekey\nVmRSS:\t   51200 kB\n", "VmRSS:"), Some(52428800.0));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1048576              1048576              files\n";
        assert_eq!(parse_max_fds(limits), Some(1048576.0));
        assert_eq!(parse_max_fds("Max open files            unlimited            unlimited            files"), None);
        assert_eq!(parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"), Some(1700000000.0));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_memory_descriptors_and_started_in_the_past() {
        let p = read().unwrap_or_else(|| panic!("/proc/self unreadable"));
        assert!(p.resident_memory_bytes > 1_000_000.0, "{p:?}");
        assert!(p.open_fds >= 3.0, "{p:?}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64());
        let now = now.unwrap_or_default();
        assert!(p.start_time_seconds <= now + 1.0 && p.start_time_seconds > now - 86400.0 * 365.0, "{p:?}");
    }
}
