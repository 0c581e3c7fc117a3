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

/// The cpuidle driver and governor and the guest's halt-polling limit, where the machine has
/// them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdlePolicy {
    /// `/sys/devices/system/cpu/cpuidle/current_driver` (`haltpoll`, `acpi_idle`,
    /// `intel_idle`, or `none`: no cpuidle driver, and an idle CPU runs the kernel's default
    /// idle, which on a KVM guest halts at once).
    pub driver: Option<String>,
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
        let driver = read("sys/devices/system/cpu/cpuidle/current_driver");
        let governor = read("sys/devices/system/cpu/cpuidle/current_governor")
            .or_else(|| read("sys/devices/system/cpu/cpuidle/current_governor_ro"));
        let guest_halt_poll_ns = read("sys/module/haltpoll/parameters/guest_halt_poll_ns")
            .and_then(|text| text.parse().ok());
        IdlePolicy {
            driver,
            governor,
            guest_halt_poll_ns,
        }
    }

    /// How long an idle vCPU polls before it halts, as far as this guest decides it: 0 with no
    /// cpuidle driver (the default idle halts at once, whatever `guest_halt_poll_ns` says),
    /// the haltpoll limit under the haltpoll governor; `None` where another governor decides
    /// or nothing could be read.
    pub fn halt_poll_ns(&self) -> Option<u64> {
        match (self.driver.as_deref(), self.governor.as_deref()) {
            (Some("none"), _) => Some(0),
            (_, Some("haltpoll")) => self.guest_halt_poll_ns,
            _ => None,
        }
    }

    /// Whether idle vCPUs halt without polling first.
    pub fn halts_at_once(&self) -> bool {
        self.halt_poll_ns() == Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(governor: Option<&str>, poll_ns: Option<&str>) -> tempfile::TempDir {
        tree_with_driver(None, governor, poll_ns)
    }

    fn tree_with_driver(
        driver: Option<&str>,
        governor: Option<&str>,
        poll_ns: Option<&str>,
    ) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("temporary directory");
        if let Some(driver) = driver {
            let dir = root.path().join("sys/devices/system/cpu/cpuidle");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("current_driver"), format!("{driver}\n")).unwrap();
        }
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

    /// A guest with no cpuidle driver halts at once, whatever the haltpoll module's limit
    /// says (this project's VM on 2026-12-02 evening: driver `none`, limit 200,000).
    #[test]
    fn a_guest_without_a_cpuidle_driver_halts_at_once() {
        let none = IdlePolicy::read_under(
            tree_with_driver(Some("none"), Some("menu"), Some("200000")).path(),
        );
        assert_eq!(none.halt_poll_ns(), Some(0));
        assert!(none.halts_at_once());
        let haltpoll = IdlePolicy::read_under(
            tree_with_driver(Some("haltpoll"), Some("haltpoll"), Some("200000")).path(),
        );
        assert_eq!(haltpoll.halt_poll_ns(), Some(200_000));
        assert!(!haltpoll.halts_at_once());
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
