//! What this machine does with an idle CPU, read from sysfs.
//!
//! A paced message wakes idle cores several times: the edge for the sender's datagram, the store
//! writer for each wait inside `fdatasync`, the recipient's host for the delivery. On a KVM guest
//! whose `haltpoll` idle driver polls for 0 ns, an idle vCPU halts at once, and waking it costs a
//! VM exit and an interrupt injected by the host: a cross-CPU round trip (`perf bench sched pipe`)
//! took 66–108 µs on the development VM against 6.6–8.3 µs with the kernel's default of polling up
//! to 200 µs, and paced medians were a third to a half lower with polling, for Courier and Redis
//! alike (docs/benchmarks.md, twenty-ninth session). The edge says so at start, and the load
//! generator records it in every report, so that a latency is read with the machine's setting that
//! moved it.

use std::path::Path;

/// The cpuidle governor and the guest's halt-polling limit, where the machine has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdlePolicy {
    /// `/sys/devices/system/cpu/cpuidle/current_governor` (`haltpoll`, `menu`, `teo`, ...).
    pub governor: Option<String>,
    /// `/sys/module/haltpoll/parameters/guest_halt_poll_ns`: how long an idle vCPU polls for
    /// work before it halts. Present on KVM guests with the haltpoll driver.
    pub guest_halt_poll_ns: Option<u64>,
}

impl IdlePolicy {
    /// Reads this machine's policy; what it cannot read stays `None`.
    pub fn read() -> IdlePolicy {
        IdlePolicy::read_under(Path::new("/"))
    }

    /// Reads the policy from the `sys/...` files under `root`, which stands for `/` (tests use
    /// a temporary directory).
    pub fn read_under(root: &Path) -> IdlePolicy {
        let read = |path: &str| {
            std::fs::read_to_string(root.join(path))
                .ok()
                .map(|text| text.trim().to_string())
                .filter(|text| !text.is_empty())
        };
        let governor = read("sys/devices/system/cpu/cpuidle/current_governor")
            .or_else(|| read("sys/devices/system/cpu/cpuidle/current_governor_ro"));
        let guest_halt_poll_ns = read("sys/module/haltpoll/parameters/guest_halt_poll_ns")
            .and_then(|text| text.parse().ok());
        IdlePolicy {
            governor,
            guest_halt_poll_ns,
        }
    }

    /// Whether idle vCPUs halt without polling first: the haltpoll governor with a limit of 0.
    pub fn halts_at_once(&self) -> bool {
        self.governor.as_deref() == Some("haltpoll") && self.guest_halt_poll_ns == Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(governor: Option<&str>, poll_ns: Option<&str>) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("temporary directory");
        if let Some(governor) = governor {
            let dir = root.path().join("sys/devices/system/cpu/cpuidle");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("current_governor"), format!("{governor}\n")).unwrap();
        }
        if let Some(poll_ns) = poll_ns {
            let dir = root.path().join("sys/module/haltpoll/parameters");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("guest_halt_poll_ns"), format!("{poll_ns}\n")).unwrap();
        }
        root
    }

    #[test]
    fn a_guest_that_never_polls_is_told_apart_from_one_that_does() {
        let never = IdlePolicy::read_under(tree(Some("haltpoll"), Some("0")).path());
        assert_eq!(never.governor.as_deref(), Some("haltpoll"));
        assert_eq!(never.guest_halt_poll_ns, Some(0));
        assert!(never.halts_at_once());

        let polls = IdlePolicy::read_under(tree(Some("haltpoll"), Some("200000")).path());
        assert_eq!(polls.guest_halt_poll_ns, Some(200_000));
        assert!(!polls.halts_at_once());
    }

    #[test]
    fn a_machine_without_the_files_reads_as_unknown_and_is_not_flagged() {
        let bare = IdlePolicy::read_under(tree(None, None).path());
        assert_eq!(bare, IdlePolicy::default());
        assert!(!bare.halts_at_once());
        // Another governor with a stray haltpoll module: its limit does not apply.
        let menu = IdlePolicy::read_under(tree(Some("menu"), Some("0")).path());
        assert!(!menu.halts_at_once());
        // Garbage in the limit is unknown, not zero.
        let garbage = IdlePolicy::read_under(tree(Some("haltpoll"), Some("lots")).path());
        assert_eq!(garbage.guest_halt_poll_ns, None);
        assert!(!garbage.halts_at_once());
    }
}
