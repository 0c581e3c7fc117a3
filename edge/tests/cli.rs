//! Issue 12, item 5: `check-config` checks what `serve` checks before it starts, so its "ok"
//! means the edge will start; and `serve` writes nothing when a check fails.

use std::process::Command;

fn check_config(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, config).expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_courier-edge"))
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run check-config");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn check_config_accepts_a_config_serve_would_start_with() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ok, text) = check_config(&format!(
        "[server]\ndata_dir = \"{}\"\n",
        dir.path().join("data").display()
    ));
    assert!(ok, "{text}");
    assert!(text.contains(": ok"), "{text}");
    assert!(
        !dir.path().join("data").exists(),
        "check-config wrote the data directory"
    );
}

#[test]
fn check_config_refuses_what_serve_would_refuse() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let damaged_reset_key_dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(damaged_reset_key_dir.path().join("keys")).expect("keys dir");
    std::fs::write(
        damaged_reset_key_dir
            .path()
            .join("keys")
            .join("stateless-reset.key"),
        b"abc",
    )
    .expect("write a damaged key");
    for (config, expected) in [
        (
            format!(
                "[server]\ndata_dir = \"{}\"\n[tls]\ncert_path = \"/nonexistent/cert.pem\"\nkey_path = \"/nonexistent/key.pem\"\n",
                data.display()
            ),
            "cannot read tls.cert_path /nonexistent/cert.pem",
        ),
        (
            format!(
                "[server]\ndata_dir = \"{}\"\n[auth]\nsigning_key_path = \"/nonexistent/signing.key\"\n",
                data.display()
            ),
            "cannot read signing key /nonexistent/signing.key",
        ),
        (
            format!(
                "[server]\ndata_dir = \"{}\"\n[[auth.verify_keys]]\nid = 2\npublic_key = \"not-base64\"\n",
                data.display()
            ),
            "auth.verify_keys id 2",
        ),
        // An entry under the development key's id (1): that key is made at the first start,
        // so no entry can be its public half. (Ed25519's base point, a valid key.)
        (
            format!(
                "[server]\ndata_dir = \"{}\"\n[[auth.verify_keys]]\nid = 1\npublic_key = \"WGZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmY=\"\n",
                data.display()
            ),
            "auth.verify_keys has an entry under auth.signing_key_id 1",
        ),
        (
            format!(
                "[server]\ndata_dir = \"{}\"\n[control]\nsocket = \"/nonexistent/ctl.sock\"\n",
                data.display()
            ),
            "control.socket /nonexistent/ctl.sock: the directory /nonexistent does not exist",
        ),
        // Longer than a Unix socket's path may be (with its temporary name).
        (
            format!(
                "[server]\ndata_dir = \"{}\"\n[control]\nsocket = \"/tmp/{}.sock\"\n",
                data.display(),
                "c".repeat(95)
            ),
            "set control.socket to a shorter path",
        ),
        // /proc refuses new files even to root.
        (
            "[server]\ndata_dir = \"/proc/courier-data\"\n".to_string(),
            "is not writable",
        ),
        // The socket is made once the shards serve: a directory the edge may not write failed
        // the start then (exit 4), after the checks had passed.
        (
            format!(
                "[server]\ndata_dir = \"{}\"\n[control]\nsocket = \"/proc/ctl.sock\"\n",
                data.display()
            ),
            "control.socket /proc/ctl.sock: the directory /proc is not writable",
        ),
        // A stateless-reset key of the wrong length failed the start after the checks too.
        (
            format!(
                "[server]\ndata_dir = \"{}\"\n",
                damaged_reset_key_dir.path().display()
            ),
            "stateless-reset.key holds 3 bytes",
        ),
    ] {
        let (ok, text) = check_config(&config);
        assert!(!ok, "check-config passed {config}");
        assert!(text.contains(expected), "expected {expected:?} in: {text}");
        assert!(!text.contains("Os {"), "a debug dump: {text}");
    }
}

/// `check-config` refuses a certificate and key that do not fit together, and a damaged
/// development certificate, as the start does. Before, it parsed only the configured files'
/// PEM: it said "ok", and `serve` then exited 4 (worth a restart), so a supervisor restarted
/// it in a loop. The errors name what to change.
#[test]
fn check_config_refuses_a_key_of_another_certificate_and_a_damaged_development_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let pair = |name: &str| {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("a certificate");
        let cert = dir.path().join(format!("{name}.crt"));
        let key = dir.path().join(format!("{name}.key"));
        std::fs::write(&cert, certified.cert.pem()).expect("cert");
        std::fs::write(&key, certified.key_pair.serialize_pem()).expect("key");
        (cert, key)
    };
    let (cert_a, _) = pair("a");
    let (_, key_b) = pair("b");
    let (ok, text) = check_config(&format!(
        "[server]\ndata_dir = \"{}\"\n[tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
        data.display(),
        cert_a.display(),
        key_b.display()
    ));
    assert!(!ok, "check-config passed a key of another certificate");
    assert!(text.contains("do not fit together"), "{text}");

    std::fs::create_dir_all(data.join("tls")).expect("tls dir");
    std::fs::write(data.join("tls").join("cert.pem"), b"not a certificate").expect("cert");
    std::fs::write(data.join("tls").join("key.pem"), b"not a key").expect("key");
    let (ok, text) = check_config(&format!("[server]\ndata_dir = \"{}\"\n", data.display()));
    assert!(!ok, "check-config passed a damaged development certificate");
    assert!(
        text.contains("the development certificate") && text.contains("to generate a new pair"),
        "{text}"
    );
}

/// `serve` with a configuration that fails a check exits without writing its data directory
/// (keys, certificates).
#[test]
fn serve_writes_nothing_when_a_check_fails() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let path = dir.path().join("edge.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\ndata_dir = \"{}\"\n[auth]\nsigning_key_path = \"/nonexistent/signing.key\"\n",
            data.display()
        ),
    )
    .expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_courier-edge"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("run serve");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("/nonexistent/signing.key"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !data.exists(),
        "serve wrote its data directory before failing"
    );
}

/// `keygen` writes an owner-only key file that `token` can sign with, prints its public key in
/// config form, and never overwrites an existing file.
#[test]
fn keygen_writes_a_usable_owner_only_key_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let key = dir.path().join("signing-2.key");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_courier-edge"))
            .args(args)
            .output()
            .expect("run courier-edge")
    };
    let key_arg = key.to_str().expect("utf-8");
    let output = run(&["keygen", "--out", key_arg, "--key-id", "2"]);
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("[[auth.verify_keys]]") && printed.contains("id = 2"),
        "{printed}"
    );
    let mode = std::fs::metadata(&key)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key is readable by its owner only");
    // `public-key` prints the same entry for the existing key (what a rotation keeps for it).
    let entry = run(&["public-key", "--key", key_arg, "--key-id", "2"]);
    assert!(entry.status.success(), "{entry:?}");
    let entry = String::from_utf8_lossy(&entry.stdout);
    assert!(
        entry.starts_with("[[auth.verify_keys]]\nid = 2\npublic_key = ")
            && printed.contains(entry.lines().nth(2).expect("its key")),
        "{entry} is not in {printed}"
    );

    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = \"{}\"\n[auth]\nsigning_key_path = \"{key_arg}\"\nsigning_key_id = 2\n",
            dir.path().join("data").display()
        ),
    )
    .expect("write config");
    let token = run(&[
        "token",
        "--config",
        config.to_str().expect("utf-8"),
        "--user",
        "9",
    ]);
    assert!(token.status.success(), "{token:?}");
    assert!(!String::from_utf8_lossy(&token.stdout).trim().is_empty());

    let again = run(&["keygen", "--out", key_arg, "--key-id", "3"]);
    assert!(!again.status.success(), "keygen overwrote an existing key");
}

/// A shard that cannot start (here: glommio refuses a locked-memory limit under 512 KiB)
/// ends `serve` with its cause and what to check, instead of "a shard stopped" or, when only
/// some shards fail, a start that hangs forever while the others wait for it.
#[test]
fn serve_says_why_a_shard_could_not_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("edge.toml");
    // A port free now (port 0 is refused: each shard would bind one of its own).
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .expect("a free port")
        .port();
    std::fs::write(
        &path,
        format!(
            "[server]\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:{port}\"\nshards = 2\n",
            dir.path().join("data").display()
        ),
    )
    .expect("write config");
    let mut child = Command::new("prlimit")
        .arg("--memlock=65536:65536")
        .arg(env!("CARGO_BIN_EXE_courier-edge"))
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run serve under prlimit (util-linux)");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve hung when a shard could not start");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    // 4: the checks passed and the start failed; a supervisor restarts it (1 is for checks).
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("could not start") && stderr.to_lowercase().contains("memlock"),
        "{stderr}"
    );
}

/// A usage error (an unknown flag, a value out of its set) exits 1, as any error an operator
/// must fix: clap's own 2 is `serve`'s "stopped, shutdown incomplete", which a supervisor
/// restarts (docs/operations.md). `--help` and `--version` still succeed.
#[test]
fn a_usage_error_exits_1_and_help_succeeds() {
    for args in [
        &["serve", "--log-format", "JSON"][..],
        &["serve", "--no-such-flag"][..],
        &["no-such-command"][..],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_courier-edge"))
            .args(args)
            .output()
            .expect("run courier-edge");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(!stderr.is_empty(), "{args:?} says what is wrong");
    }
    for args in [&["--help"][..], &["--version"][..]] {
        let output = Command::new(env!("CARGO_BIN_EXE_courier-edge"))
            .args(args)
            .output()
            .expect("run courier-edge");
        assert!(output.status.success(), "{args:?}");
        assert!(!output.stdout.is_empty(), "{args:?} prints to stdout");
    }
}
