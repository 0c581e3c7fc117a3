//! TLS and QUIC configuration shared by every shard.
//!
//! One rustls `ServerConfig` (and so one session cache) is shared by all shards, so a client can
//! resume on whichever shard the kernel hands its new connection to. Session tickets are
//! stateful (the cache holds the session; the ticket is its id) because rustls only offers 0-RTT
//! for those; `max_early_data_size` is `u32::MAX` as quinn requires.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn_proto::crypto::rustls::QuicServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;

/// A certificate chain and its key.
#[derive(Debug)]
pub struct Identity {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Where the development certificate lives.
pub fn dev_cert_paths(config: &Config) -> (PathBuf, PathBuf) {
    let dir = config.server.data_dir.join("tls");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// Loads the configured certificate, or the development one, generating it on first start.
/// Returns the identity and whether a certificate was just generated.
pub fn load_identity(config: &Config) -> Result<(Identity, bool), String> {
    if !config.tls.cert_path.as_os_str().is_empty() {
        return read_identity(&config.tls.cert_path, &config.tls.key_path, CONFIGURED)
            .map(|id| (id, false));
    }
    let (cert_path, key_path) = dev_cert_paths(config);
    if cert_path.exists() && key_path.exists() {
        return read_identity(&cert_path, &key_path, DEVELOPMENT).map(|id| (id, false));
    }
    // Neither, or one without the other (a first start that crashed in between): a new pair
    // replaces it.
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let (cert_pem, key_pem) = generate_dev_cert(DevCertKey::Ed25519, names)?;
    write_dev_cert(&cert_path, &key_path, &cert_pem, &key_pem)?;
    read_identity(&cert_path, &key_path, DEVELOPMENT).map(|id| (id, true))
}

/// The key type of a generated development certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevCertKey {
    /// What the edge generates: the cheapest signature per full handshake (decision 0037).
    /// Every client on the SDK (rustls) verifies it; some other TLS stacks do not.
    Ed25519,
    /// The widest supported choice, for clients whose TLS stack lacks Ed25519.
    EcdsaP256,
}

/// A self-signed certificate for `names` and its private key, both PEM.
pub fn generate_dev_cert(key: DevCertKey, names: Vec<String>) -> Result<(String, String), String> {
    let algorithm = match key {
        DevCertKey::Ed25519 => &rcgen::PKCS_ED25519,
        DevCertKey::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
    };
    let key_pair = rcgen::KeyPair::generate_for(algorithm)
        .map_err(|e| format!("cannot generate a {key:?} key: {e}"))?;
    let cert = rcgen::CertificateParams::new(names)
        .and_then(|params| params.self_signed(&key_pair))
        .map_err(|e| format!("cannot generate a certificate: {e}"))?;
    Ok((cert.pem(), key_pair.serialize_pem()))
}

/// Writes a development certificate where [`load_identity`] looks for it, the key readable by
/// its owner only.
///
/// Each file is replaced in one step (`files::replace_file`), the key first: a crash leaves the
/// old pair, or a new key without its certificate, never a torn file. [`load_identity`]
/// generates a new pair whenever one of the two is missing.
pub fn write_dev_cert(
    cert_path: &Path,
    key_path: &Path,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(), String> {
    let temporary = |path: &Path| {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        path.with_file_name(name)
    };
    crate::files::replace_file(key_path, &temporary(key_path), key_pem.as_bytes(), 0o600)?;
    crate::files::replace_file(cert_path, &temporary(cert_path), cert_pem.as_bytes(), 0o644)
}

/// Where a certificate and key come from, for errors that name the setting to change.
struct IdentitySource {
    cert_setting: &'static str,
    key_setting: &'static str,
    /// What to do about a damaged file.
    remedy: &'static str,
}

const CONFIGURED: IdentitySource = IdentitySource {
    cert_setting: "tls.cert_path",
    key_setting: "tls.key_path",
    remedy: "point the setting at the right file",
};

/// The development certificate the edge made in its data directory.
const DEVELOPMENT: IdentitySource = IdentitySource {
    cert_setting: "the development certificate",
    key_setting: "the development certificate's key",
    remedy: "delete both files of the data directory's tls/ to generate a new pair (clients \
             must then trust the new certificate)",
};

const CLUSTER: IdentitySource = IdentitySource {
    cert_setting: "cluster.cert_path",
    key_setting: "cluster.key_path",
    remedy: "point the setting at the right file",
};

fn read_identity(
    cert_path: &Path,
    key_path: &Path,
    source: IdentitySource,
) -> Result<Identity, String> {
    let IdentitySource {
        cert_setting,
        key_setting,
        remedy,
    } = source;
    let cert_pem = std::fs::read(cert_path)
        .map_err(|e| format!("cannot read {cert_setting} {}: {e}", cert_path.display()))?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "{cert_setting} {} is not a PEM certificate chain: {e}; {remedy}",
                cert_path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{cert_setting} {} holds no certificate; {remedy}",
            cert_path.display()
        ));
    }
    let key_pem = std::fs::read(key_path)
        .map_err(|e| format!("cannot read {key_setting} {}: {e}", key_path.display()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| {
            format!(
                "{key_setting} {} is not a PEM private key: {e}; {remedy}",
                key_path.display()
            )
        })?
        .ok_or_else(|| {
            format!(
                "{key_setting} {} holds no private key; {remedy}",
                key_path.display()
            )
        })?;
    Ok(Identity { certs, key })
}

/// What `check-config` checks of the certificates and keys, as the start would use them: each
/// readable, and each key the one of its certificate. The development certificate only if it
/// was made already (the start makes it otherwise).
pub fn check_identities(config: &Config) -> Result<(), String> {
    let provider = crypto_provider();
    let (dev_cert, dev_key) = dev_cert_paths(config);
    if !config.tls.cert_path.as_os_str().is_empty() || (dev_cert.exists() && dev_key.exists()) {
        let (identity, _) = load_identity(config)?;
        certified_key(identity, &provider)?;
    }
    if config.cluster.enabled() {
        let cluster = load_cluster_tls(config)?;
        let link = Identity {
            certs: cluster.identity.certs.clone(),
            key: cluster.identity.key.clone_key(),
        };
        certified_key(link, &provider)
            .map_err(|e| format!("cluster.cert_path and cluster.key_path: {e}"))?;
    }
    Ok(())
}

/// ring's provider with aws-lc-rs's key exchanges and signing keys, and AES-128-GCM/SHA-256
/// preferred.
///
/// Key exchange from aws-lc-rs: the handshake's X25519 (a key pair and an agreement per full
/// handshake) was the largest cost of a connection storm, and aws-lc's assembly does it in
/// about half of ring's time on this machine (decision 0017). The groups are the ones ring
/// offered: X25519, then P-256 and P-384. aws-lc's hybrid X25519MLKEM768 is left out: it adds
/// an ML-KEM encapsulation to every full handshake, for post-quantum secrecy that no client
/// of the SDK asks for yet.
///
/// Signing from aws-lc-rs too: a full handshake signs once with the edge's key. aws-lc signs
/// ECDSA P-256 about as fast as ring, and Ed25519 in about 40% of ring's time (11 µs against
/// 27–33 on the AMD development host, 16 against 40 on the Intel one; decision 0037). The
/// development certificate is Ed25519.
///
/// Everything else stays ring's: its AES-GCM keys are smaller than aws-lc's, and a connection
/// holds several (aws-lc's cost about 1 KB more per idle connection, decision 0017). ring's
/// random bytes are a `getrandom` system call per fill (four per full handshake), and still
/// cheaper here than aws-lc's generator, whose CTR-DRBG with RDRAND on every call took more of
/// a handshake's CPU (docs/benchmarks.md, fortieth session).
///
/// Cipher suites: rustls lists AES-256-GCM/SHA-384 first; its SHA-384 key schedule costs more
/// than SHA-256, which runs on the CPU's SHA extensions, and AES-128 seals packets in fewer
/// rounds. AES-128 keeps the security level QUIC's own Initial packets use.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: key_exchange_groups(),
        key_provider: rustls::crypto::aws_lc_rs::default_provider().key_provider,
        ..rustls::crypto::ring::default_provider()
    })
}

/// The key exchange groups the edge accepts, X25519 first, from aws-lc-rs (decision 0017).
/// The load generator's clients offer the same ones.
pub fn key_exchange_groups() -> Vec<&'static dyn rustls::crypto::SupportedKxGroup> {
    use rustls::crypto::aws_lc_rs::kx_group;
    vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1]
}

/// The DNS name every edge's cluster certificate carries: a link's connecting side checks it.
pub const LINK_SERVER_NAME: &str = "courier-link";

/// The DNS name of edge `edge`'s link certificate with `cluster.link_certificates_name_the_edge`.
pub fn link_name_of(edge: u32) -> String {
    format!("edge-{edge}.{LINK_SERVER_NAME}")
}

/// Whether the end-entity certificate `cert` is valid for the DNS name `name` (its subject
/// alternative names, as a TLS client reads them). Its signature is checked by the handshake,
/// not here.
pub fn certificate_names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(name) = rustls::pki_types::ServerName::try_from(name) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// What links between edges authenticate with (`[cluster]`): this edge's cluster certificate
/// and the cluster's CA.
#[derive(Debug)]
pub struct ClusterTls {
    identity: Identity,
    roots: Arc<rustls::RootCertStore>,
    /// The CA's certificates as read, for [`certificates_fingerprint`].
    ca_certs: Vec<CertificateDer<'static>>,
}

impl ClusterTls {
    /// The certificate chain this edge presents to other edges.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.identity.certs
    }

    /// The certificates of the CA that admits peer edges.
    pub fn ca_certs(&self) -> &[CertificateDer<'static>] {
        &self.ca_certs
    }
}

/// Loads `[cluster]`'s CA, certificate and key.
pub fn load_cluster_tls(config: &Config) -> Result<ClusterTls, String> {
    let cluster = &config.cluster;
    let identity = read_identity(&cluster.cert_path, &cluster.key_path, CLUSTER)?;
    if cluster.link_certificates_name_the_edge {
        let name = link_name_of(cluster.edge_id);
        if !identity
            .certs
            .first()
            .is_some_and(|cert| certificate_names(cert, &name))
        {
            return Err(format!(
                "cluster.cert_path {} does not name this edge ({name}), and \
                 cluster.link_certificates_name_the_edge is on: issue it with that DNS name \
                 (besides {LINK_SERVER_NAME}), or turn the setting off",
                cluster.cert_path.display()
            ));
        }
    }
    let ca_pem = std::fs::read(&cluster.ca_cert_path).map_err(|e| {
        format!(
            "cannot read cluster.ca_cert_path {}: {e}",
            cluster.ca_cert_path.display()
        )
    })?;
    let mut roots = rustls::RootCertStore::empty();
    let mut ca_certs = Vec::new();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_slice()) {
        let cert = cert.map_err(|e| {
            format!(
                "{} is not a PEM certificate: {e}",
                cluster.ca_cert_path.display()
            )
        })?;
        ca_certs.push(cert.clone());
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", cluster.ca_cert_path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "{} holds no CA certificate",
            cluster.ca_cert_path.display()
        ));
    }
    Ok(ClusterTls {
        identity,
        roots: Arc::new(roots),
        ca_certs,
    })
}

/// Presents the cluster certificate to a peer edge (a client hello offering the link ALPN)
/// and the public one to everyone else.
#[derive(Debug)]
struct CertificateByAlpn {
    public: Arc<rustls::sign::CertifiedKey>,
    link: Arc<rustls::sign::CertifiedKey>,
}

impl rustls::server::ResolvesServerCert for CertificateByAlpn {
    fn resolve(
        &self,
        client_hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let wants_link = client_hello.alpn().is_some_and(|mut offered| {
            offered.any(|alpn| alpn == courier_protocol::link::LINK_ALPN)
        });
        Some(if wants_link { &self.link } else { &self.public }.clone())
    }
}

fn certified_key(
    identity: Identity,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    rustls::sign::CertifiedKey::from_der(identity.certs, identity.key, provider)
        .map(Arc::new)
        .map_err(|e| format!("tls certificate and key do not fit together: {e}"))
}

/// The QUIC client configuration a shard opens its links to other edges with: it presents the
/// cluster certificate and accepts only a peer whose certificate the cluster's CA signed. The
/// link sends keep-alives, so a dead peer is noticed within the idle timeout.
pub fn link_client_config(
    config: &Config,
    cluster: &ClusterTls,
) -> Result<quinn_proto::ClientConfig, String> {
    let identity = Identity {
        certs: cluster.identity.certs.clone(),
        key: cluster.identity.key.clone_key(),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(cluster.roots.clone())
        .with_client_auth_cert(identity.certs, identity.key)
        .map_err(|e| format!("cluster certificate and key do not fit together: {e}"))?;
    tls.alpn_protocols = vec![courier_protocol::link::LINK_ALPN.to_vec()];
    let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| format!("tls: {e}"))?;
    let mut client = quinn_proto::ClientConfig::new(Arc::new(crypto));
    let mut transport = transport_config(config);
    // The accepting edge may acknowledge this edge's packets within QUIC's own 25 ms, whatever
    // `quic.client_ack_delay_ms` says: a link's loss recovery should not wait for a delay
    // chosen for chatty clients. (The accepting side cannot tell a link from a client before
    // the handshake, so it asks this side for `client_ack_delay_ms`, which validation bounds.)
    transport.ack_frequency_config(Some(ack_frequency(LINK_ACK_DELAY)));
    transport.keep_alive_interval(Some(LINK_KEEP_ALIVE));
    let idle = quinn_proto::IdleTimeout::try_from(LINK_IDLE_TIMEOUT).expect("a few seconds");
    transport.max_idle_timeout(Some(idle));
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// How often a link proves it is alive, and how long without a packet ends it.
const LINK_KEEP_ALIVE: Duration = Duration::from_secs(1);

/// How long the dialing edge lets the accepting one delay its acknowledgements: QUIC's own
/// default.
const LINK_ACK_DELAY: Duration = Duration::from_millis(25);
const LINK_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The QUIC server configuration every shard's endpoint uses, and the TLS session cache it
/// resumes from (for the metrics). With `cluster`, it also accepts links from other edges
/// (their ALPN, their certificate checked against the cluster's CA).
pub fn server_config(
    config: &Config,
    identity: Identity,
    cluster: Option<&ClusterTls>,
) -> Result<(Arc<quinn_proto::ServerConfig>, Arc<SessionCache>), String> {
    let builder = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("tls: {e}"))?;
    let mut tls = match cluster {
        None => builder
            .with_no_client_auth()
            .with_single_cert(identity.certs, identity.key)
            .map_err(|e| format!("tls certificate and key do not fit together: {e}"))?,
        Some(cluster) => {
            // Clients send no certificate; a link must, and the shard closes a link
            // connection without one (`Shard::handshake_done`).
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                cluster.roots.clone(),
                crypto_provider(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| format!("cluster.ca_cert_path: {e}"))?;
            let provider = crypto_provider();
            let link = Identity {
                certs: cluster.identity.certs.clone(),
                key: cluster.identity.key.clone_key(),
            };
            builder
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(Arc::new(CertificateByAlpn {
                    public: certified_key(identity, &provider)?,
                    link: certified_key(link, &provider)?,
                }))
        }
    };
    tls.alpn_protocols = vec![courier_protocol::ALPN.to_vec()];
    if cluster.is_some() {
        tls.alpn_protocols
            .push(courier_protocol::link::LINK_ALPN.to_vec());
    }
    tls.max_early_data_size = u32::MAX;
    let sessions = Arc::new(SessionCache::new(config.tls.session_cache_entries));
    tls.session_storage = sessions.clone();
    // One ticket per handshake, not rustls's two. A client resumes with its newest ticket and
    // gets a new one each time, so the second was a spare used only when a connection died
    // before its ticket arrived: it took half of `session_cache_entries` (every ticket is a
    // cached session, evicted oldest first), so the cache remembered half as many devices,
    // and it cost a session encoding and a cache insert per handshake.
    tls.send_tls13_tickets = 1;
    tls.send_half_rtt_data = true;
    // Our order, not the client's: AES-128-GCM with SHA-256 (see `crypto_provider`).
    tls.ignore_client_order = true;
    let crypto = QuicServerConfig::try_from(Arc::new(tls)).map_err(|e| format!("tls: {e}"))?;

    let mut token_secret = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut token_secret);
    let token_key = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&token_secret);
    let mut server = quinn_proto::ServerConfig::new(Arc::new(crypto), Arc::new(token_key));
    server.transport_config(Arc::new(transport_config(config)));
    server.migration(true);
    Ok((Arc::new(server), sessions))
}

/// Transport parameters: small stream counts (quinn reserves state for every stream the peer
/// may open) and bounded windows.
pub fn transport_config(config: &Config) -> quinn_proto::TransportConfig {
    let quic = &config.quic;
    let mut transport = quinn_proto::TransportConfig::default();
    // One stream carries the protocol; every permitted stream costs state up front.
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // No QUIC DATAGRAM frames: the protocol has no use for them, and quinn would otherwise
    // advertise them and queue each one received (up to 1.25 MB per connection, each entry
    // holding its whole packet) until the application reads it, which the edge never does.
    // Unadvertised, a DATAGRAM frame is a protocol violation that closes its connection.
    transport.datagram_receive_buffer_size(None);
    transport.stream_receive_window(quic.stream_receive_window_bytes.into());
    transport.receive_window(quic.receive_window_bytes.into());
    transport.send_window(quic.send_window_bytes);
    let idle = quinn_proto::IdleTimeout::try_from(Duration::from_millis(quic.idle_timeout_ms))
        .unwrap_or(quinn_proto::IdleTimeout::from(
            quinn_proto::VarInt::from_u32(30_000),
        ));
    transport.max_idle_timeout(Some(idle));
    if !quic.mtu_discovery {
        transport.mtu_discovery_config(None);
    }
    // Ask clients to acknowledge less often (the QUIC ACK frequency extension): an app that
    // sends again within the delay carries the acknowledgement in that packet instead of an
    // ACK-only datagram of its own.
    transport.ack_frequency_config(Some(ack_frequency(Duration::from_millis(
        quic.client_ack_delay_ms,
    ))));
    transport
}

/// What this side asks of its peer (QUIC ACK frequency extension): acknowledge within
/// `max_ack_delay`, and at the latest after `ACK_ELICITING_THRESHOLD` ack-eliciting packets.
fn ack_frequency(max_ack_delay: Duration) -> quinn_proto::AckFrequencyConfig {
    let mut config = quinn_proto::AckFrequencyConfig::default();
    config
        .max_ack_delay(Some(max_ack_delay))
        .ack_eliciting_threshold(quinn_proto::VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    config
}

/// Ack-eliciting packets a client may receive before it must acknowledge them.
const ACK_ELICITING_THRESHOLD: u32 = 4;

/// Bytes of the stateless-reset secret.
const RESET_SECRET_BYTES: usize = 64;

/// Where the stateless-reset secret lives: with the data, so it outlives the process.
pub fn reset_key_path(config: &Config) -> PathBuf {
    config
        .server
        .data_dir
        .join("keys")
        .join("stateless-reset.key")
}

/// The stateless-reset key, shared by every shard (so any shard can answer for any connection
/// id) and kept in the data directory (generated on first start), so that after a crash and
/// restart the edge's resets for connections it forgot are ones their clients accept: they
/// learn at their next packet that the connection is gone and reconnect at once, instead of
/// waiting for the idle timeout. Returns whether the key was generated.
pub fn load_or_create_reset_key(config: &Config) -> Result<(Arc<ring::hmac::Key>, bool), String> {
    let path = reset_key_path(config);
    let (secret, generated) = if path.exists() {
        (read_reset_key(&path)?, false)
    } else {
        let mut secret = vec![0u8; RESET_SECRET_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
        crate::files::write_private_file(&path, &secret)?;
        (secret, true)
    };
    Ok((
        Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret)),
        generated,
    ))
}

/// The stateless-reset key's secret at `path`, of the one length it may have.
fn read_reset_key(path: &Path) -> Result<Vec<u8>, String> {
    let secret = std::fs::read(path)
        .map_err(|e| format!("cannot read the reset key {}: {e}", path.display()))?;
    if secret.len() != RESET_SECRET_BYTES {
        return Err(format!(
            "{} holds {} bytes, expected {RESET_SECRET_BYTES}: delete it to generate a new one",
            path.display(),
            secret.len()
        ));
    }
    Ok(secret)
}

/// For `check-config` and `serve`'s checks: a stateless-reset key already in the data
/// directory must load (one that does not failed the start after the checks, exit 4, at every
/// restart). A missing one is made at the start.
pub fn check_reset_key(config: &Config) -> Result<(), String> {
    let path = reset_key_path(config);
    if path.exists() {
        read_reset_key(&path)?;
    }
    Ok(())
}

/// The TLS session cache shared by every shard: at most `entries_max` sessions, the oldest
/// evicted first, and every operation O(1).
///
/// rustls's `ServerSessionMemoryCache` removes a taken session (every resumption takes one: a
/// 0-RTT ticket is single-use) with a linear search of its eviction queue. With 100,000 cached
/// sessions that search was a third of the edge's CPU while clients kept connecting, and the
/// reason handshakes got slower the more connections were open (issue 10). Here a taken entry
/// leaves a stale slot in the queue, which eviction skips; the queue is compacted when stale
/// slots outnumber live ones, so it stays under twice the maximum.
#[derive(Debug)]
pub struct SessionCache {
    inner: std::sync::Mutex<SessionCacheInner>,
    entries_max: usize,
}

#[derive(Debug, Default)]
struct SessionCacheInner {
    /// Session id → the session.
    sessions: std::collections::HashMap<Vec<u8>, CachedSession>,
    /// Ids in insertion order with their stamp; a slot whose stamp no longer matches the map is
    /// stale (taken or overwritten).
    order: std::collections::VecDeque<(Vec<u8>, u64)>,
    next_stamp: u64,
}

/// A cached session: rustls's encoding, its insertion stamp, and when it was made.
#[derive(Debug)]
struct CachedSession {
    value: Vec<u8>,
    stamp: u64,
    /// Wall-clock seconds; kept across a saved restart, so a session never outlives
    /// [`SAVED_SESSION_AGE_SECS_MAX`] by being saved again and again.
    made_at_secs: u64,
}

impl SessionCache {
    pub fn new(entries_max: usize) -> SessionCache {
        SessionCache {
            inner: std::sync::Mutex::new(SessionCacheInner::default()),
            entries_max: entries_max.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SessionCacheInner> {
        // Every method leaves the cache consistent before it can panic, so a poisoned lock is
        // safe to reuse.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sessions held now.
    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What starts a saved session file (`SessionCache::save`): its format, version 2.
const SAVED_SESSIONS_MAGIC: &[u8; 8] = b"CRSESS02";
/// Where the session count is in a saved file: after the magic and the fingerprint.
const SAVED_COUNT_AT: usize = SAVED_SESSIONS_MAGIC.len() + 32;
/// Longest session id and session saved or restored: rustls's ids are 32 bytes and its
/// sessions a few hundred (a link's, with the peer's certificates, one to two thousand); a
/// longer one is not saved (its client makes a full handshake).
const SAVED_SESSION_ID_BYTES_MAX: usize = 255;
const SAVED_SESSION_BYTES_MAX: usize = 4096;
/// Bytes of a saved session beyond its id and value: the id's length, the time it was made,
/// the value's length.
const SAVED_SESSION_OVERHEAD_BYTES: usize = 1 + 8 + 2;
/// Sessions older than this are neither saved nor restored: the lifetime rustls announces
/// in its tickets (24 h), which the server side of rustls does not itself check for stateful
/// sessions. Before sessions were saved they lived at most as long as the process.
pub const SAVED_SESSION_AGE_SECS_MAX: u64 = 24 * 60 * 60;

/// Where a stopping edge leaves its TLS sessions for its next start
/// (`tls.sessions_survive_restart`).
pub fn saved_sessions_path(config: &Config) -> PathBuf {
    config.server.data_dir.join("tls").join("sessions")
}

/// SHA-256 of certificate lists, each certificate length-prefixed: sessions saved under one
/// set of certificates are not resumed under another. The edge's own chains (a rotated
/// certificate, perhaps a compromised one, also retires the sessions made with it) and, in a
/// cluster, the CA that admits peer edges (a link session resumes as the peer it was made
/// with, without showing its certificate again: a new CA must retire them).
pub fn certificates_fingerprint<'a>(
    lists: impl IntoIterator<Item = &'a [CertificateDer<'static>]>,
) -> [u8; 32] {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    for list in lists {
        digest.update(&(list.len() as u64).to_le_bytes());
        for cert in list {
            digest.update(&(cert.len() as u64).to_le_bytes());
            digest.update(cert);
        }
    }
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(digest.finish().as_ref());
    fingerprint
}

/// Raised whenever the code changes what the edge advertises in its transport parameters
/// beyond what `[quic]` sets (2: no QUIC datagrams, `max_datagram_frame_size` gone).
const TRANSPORT_PARAMETERS_VERSION: u32 = 2;

/// What saved sessions must match to be resumed: the certificates
/// ([`certificates_fingerprint`]) and the transport parameters the edge advertises. A client
/// resuming with 0-RTT checks that no limit it cached with its ticket went down (RFC 9000,
/// 7.4.1) and closes the connection if one did, and the session it came with is used up by
/// then: sessions saved under other parameters (a smaller window in the config, a release
/// that advertises less) are dropped at start instead, and their clients make one full
/// handshake. Before, a planned restart that lowered a window failed every such client once.
pub fn sessions_fingerprint<'a>(
    lists: impl IntoIterator<Item = &'a [CertificateDer<'static>]>,
    config: &Config,
) -> [u8; 32] {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    digest.update(&certificates_fingerprint(lists));
    digest.update(&TRANSPORT_PARAMETERS_VERSION.to_le_bytes());
    digest.update(&u64::from(config.quic.stream_receive_window_bytes).to_le_bytes());
    digest.update(&u64::from(config.quic.receive_window_bytes).to_le_bytes());
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(digest.finish().as_ref());
    fingerprint
}

/// Seconds since the Unix epoch, by the wall clock (a session's age must survive a restart).
fn unix_now_secs() -> u64 {
    courier_core::clock::wall_clock_ms() / 1000
}

impl SessionCache {
    /// Writes every live session younger than [`SAVED_SESSION_AGE_SECS_MAX`], oldest first,
    /// to `path` (mode 0600, through a temporary file renamed over it) under `fingerprint`
    /// (`certificates_fingerprint`); returns how many. The cache is emptied as it is saved:
    /// a handshake still running somewhere cannot resume a saved session, which the next start
    /// will offer again. The file holds resumption secrets: it is as sensitive as the TLS key.
    pub fn save(&self, path: &Path, fingerprint: &[u8; 32]) -> Result<usize, String> {
        let oldest_kept_secs = unix_now_secs().saturating_sub(SAVED_SESSION_AGE_SECS_MAX);
        let mut bytes = Vec::new();
        bytes.extend_from_slice(SAVED_SESSIONS_MAGIC);
        bytes.extend_from_slice(fingerprint);
        bytes.extend_from_slice(&0u32.to_le_bytes());
        let mut count = 0u32;
        {
            let mut inner = self.lock();
            let inner = &mut *inner;
            let sessions = std::mem::take(&mut inner.sessions);
            for (id, stamp) in std::mem::take(&mut inner.order) {
                let Some(session) = sessions.get(&id).filter(|s| s.stamp == stamp) else {
                    continue;
                };
                if id.len() > SAVED_SESSION_ID_BYTES_MAX
                    || session.value.len() > SAVED_SESSION_BYTES_MAX
                    || session.made_at_secs < oldest_kept_secs
                {
                    continue;
                }
                bytes.push(id.len() as u8);
                bytes.extend_from_slice(&id);
                bytes.extend_from_slice(&session.made_at_secs.to_le_bytes());
                bytes.extend_from_slice(&(session.value.len() as u16).to_le_bytes());
                bytes.extend_from_slice(&session.value);
                count += 1;
            }
        }
        bytes[SAVED_COUNT_AT..SAVED_COUNT_AT + 4].copy_from_slice(&count.to_le_bytes());
        let checksum = ring::digest::digest(&ring::digest::SHA256, &bytes);
        bytes.extend_from_slice(checksum.as_ref());
        crate::files::replace_file(path, &saving_path(path), &bytes, 0o600)?;
        Ok(count as usize)
    }

    /// Takes back the sessions a stopped edge saved at `path`, if it saved them under
    /// `fingerprint`; returns how many. The file is deleted (and the deletion synced) before any
    /// session is used: a 0-RTT session must resume once, so a saved file is used at most once,
    /// and not at all if it cannot be deleted. A file that is torn, damaged, too large or of
    /// other certificates is deleted and restores nothing (`Err` says why); sessions older than
    /// [`SAVED_SESSION_AGE_SECS_MAX`] are dropped; no file restores nothing. The checksum finds
    /// damage, not forgery: whoever can write the data directory can change what the edge
    /// stores and which keys it holds anyway (docs/security.md).
    pub fn restore(&self, path: &Path, fingerprint: &[u8; 32]) -> Result<usize, String> {
        // A save cut short leaves its temporary file: secrets no one will read.
        let _ = std::fs::remove_file(saving_path(path));
        let file_bytes_max =
            (SAVED_COUNT_AT + 4 + 32).saturating_add(self.entries_max.saturating_mul(
                SAVED_SESSION_OVERHEAD_BYTES + SAVED_SESSION_ID_BYTES_MAX + SAVED_SESSION_BYTES_MAX,
            ));
        // Only a regular file: opening a FIFO put there would block the start for good.
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
            Ok(meta) if !meta.file_type().is_file() => {
                let _ = std::fs::remove_file(path);
                return Err(format!(
                    "{} is not a regular file (a link, a FIFO?): deleted unread, none restored",
                    path.display()
                ));
            }
            Ok(_) => {}
        }
        let file = match std::fs::File::open(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
            Ok(file) => file,
        };
        let mut bytes = Vec::new();
        let read = std::io::Read::read_to_end(
            &mut std::io::Read::take(file, file_bytes_max as u64 + 1),
            &mut bytes,
        );
        std::fs::remove_file(path).map_err(|e| {
            format!(
                "cannot delete {} (so none of its sessions is used; check the permissions of \
                 its directory, or delete it by hand): {e}",
                path.display()
            )
        })?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|dir| dir.sync_all())
                .map_err(|e| {
                    format!(
                        "cannot sync {} after deleting the saved sessions (so none is used): {e}",
                        dir.display()
                    )
                })?;
        }
        read.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if bytes.len() > file_bytes_max {
            return Err(format!(
                "{} is larger than tls.session_cache_entries sessions can be (did the setting \
                 shrink?): none restored",
                path.display()
            ));
        }
        let now_secs = unix_now_secs();
        let oldest_kept_secs = now_secs.saturating_sub(SAVED_SESSION_AGE_SECS_MAX);
        let mut restored = 0;
        for session in parse_saved_sessions(&bytes, fingerprint, self.entries_max)? {
            // Made in the future: the clock stepped back, or the file was not ours to trust.
            if session.made_at_secs < oldest_kept_secs || session.made_at_secs > now_secs {
                continue;
            }
            self.put_made_at(
                session.id.to_vec(),
                session.value.to_vec(),
                session.made_at_secs,
            );
            restored += 1;
        }
        Ok(restored.min(self.entries_max))
    }

    /// Caches `value` as a session made at `made_at_secs`, evicting the oldest beyond the
    /// maximum.
    fn put_made_at(&self, key: Vec<u8>, value: Vec<u8>, made_at_secs: u64) {
        let mut inner = self.lock();
        let stamp = inner.next_stamp;
        inner.next_stamp += 1;
        inner.order.push_back((key.clone(), stamp));
        inner.sessions.insert(
            key,
            CachedSession {
                value,
                stamp,
                made_at_secs,
            },
        );
        while inner.sessions.len() > self.entries_max {
            let Some((oldest, stamp)) = inner.order.pop_front() else {
                break;
            };
            if inner.is_live(&oldest, stamp) {
                inner.sessions.remove(&oldest);
            }
        }
        if inner.order.len() > 2 * self.entries_max {
            let SessionCacheInner {
                sessions, order, ..
            } = &mut *inner;
            order.retain(|(id, stamp)| sessions.get(id).is_some_and(|s| s.stamp == *stamp));
        }
    }
}

/// The temporary file a save writes before renaming it over `path`.
pub fn saving_path(path: &Path) -> PathBuf {
    path.with_extension("saving")
}

/// A session read from a saved file.
#[derive(Debug, PartialEq, Eq)]
struct SavedSession<'a> {
    id: &'a [u8],
    made_at_secs: u64,
    /// rustls's encoding of the session.
    value: &'a [u8],
}

/// The newest `entries_max` sessions of a saved file (the cache's size, which may have shrunk
/// since the save), oldest first, if the file is whole and of `fingerprint`. The older ones
/// are checked and skipped, not collected: a file of millions of tiny entries cannot take
/// their memory.
fn parse_saved_sessions<'a>(
    bytes: &'a [u8],
    fingerprint: &[u8; 32],
    entries_max: usize,
) -> Result<Vec<SavedSession<'a>>, String> {
    let torn = || "the saved TLS sessions are torn or damaged: none restored".to_string();
    let body_bytes = bytes.len().checked_sub(32).ok_or_else(torn)?;
    let (body, checksum) = bytes.split_at(body_bytes);
    if ring::digest::digest(&ring::digest::SHA256, body).as_ref() != checksum {
        return Err(torn());
    }
    let rest = body.strip_prefix(SAVED_SESSIONS_MAGIC).ok_or_else(|| {
        "the saved TLS sessions are of another format (another version saved them): none \
         restored"
            .to_string()
    })?;
    let (saved_fingerprint, rest) = rest.split_at_checked(32).ok_or_else(torn)?;
    if saved_fingerprint != fingerprint {
        return Err(
            "the saved TLS sessions were made with other certificates: none restored".into(),
        );
    }
    let (count, mut rest) = rest.split_at_checked(4).ok_or_else(torn)?;
    let count = u32::from_le_bytes(count.try_into().expect("4 bytes")) as usize;
    let skipped = count.saturating_sub(entries_max);
    let mut seen = 0usize;
    let mut sessions = Vec::with_capacity(count.min(entries_max));
    while !rest.is_empty() {
        if seen == count {
            return Err(torn());
        }
        let (&id_bytes, after) = rest.split_first().ok_or_else(torn)?;
        let (id, after) = after
            .split_at_checked(usize::from(id_bytes))
            .ok_or_else(torn)?;
        let (made_at, after) = after.split_at_checked(8).ok_or_else(torn)?;
        let made_at_secs = u64::from_le_bytes(made_at.try_into().expect("8 bytes"));
        let (value_len, after) = after.split_at_checked(2).ok_or_else(torn)?;
        let value_len = usize::from(u16::from_le_bytes(value_len.try_into().expect("2 bytes")));
        if value_len > SAVED_SESSION_BYTES_MAX {
            return Err(torn());
        }
        let (value, after) = after.split_at_checked(value_len).ok_or_else(torn)?;
        if seen >= skipped {
            sessions.push(SavedSession {
                id,
                made_at_secs,
                value,
            });
        }
        seen += 1;
        rest = after;
    }
    if seen != count {
        return Err(torn());
    }
    Ok(sessions)
}

impl SessionCacheInner {
    fn is_live(&self, id: &[u8], stamp: u64) -> bool {
        self.sessions
            .get(id)
            .is_some_and(|session| session.stamp == stamp)
    }
}

impl rustls::server::StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.put_made_at(key, value, unix_now_secs());
        true
    }

    /// Past its lifetime a session is not resumed: rustls's server does not check that for
    /// stateful sessions, and a quiet edge can run for weeks.
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let oldest_secs = unix_now_secs().saturating_sub(SAVED_SESSION_AGE_SECS_MAX);
        self.lock()
            .sessions
            .get(key)
            .filter(|session| session.made_at_secs >= oldest_secs)
            .map(|session| session.value.clone())
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let oldest_secs = unix_now_secs().saturating_sub(SAVED_SESSION_AGE_SECS_MAX);
        self.lock()
            .sessions
            .remove(key)
            .filter(|session| session.made_at_secs >= oldest_secs)
            .map(|session| session.value)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link certificate names the edges of its DNS names, as a TLS client reads them.
    #[test]
    fn a_link_certificate_names_the_edges_of_its_dns_names() {
        let cert = |names: &[&str]| {
            let names = names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>();
            rcgen::generate_simple_self_signed(names)
                .expect("certificate")
                .cert
                .der()
                .clone()
        };
        let edge_7 = cert(&["courier-link", "edge-7.courier-link"]);
        assert!(certificate_names(&edge_7, &link_name_of(7)));
        assert!(certificate_names(&edge_7, LINK_SERVER_NAME));
        assert!(!certificate_names(&edge_7, &link_name_of(8)));
        assert!(!certificate_names(&edge_7, &link_name_of(77)));
        let plain = cert(&["courier-link"]);
        assert!(!certificate_names(&plain, &link_name_of(7)));
    }
    use rustls::server::StoresServerSessions;

    #[test]
    fn the_session_cache_is_bounded_evicts_the_oldest_and_takes_once() {
        let cache = SessionCache::new(3);
        for id in 0..3u8 {
            assert!(cache.put(vec![id], vec![id; 4]));
        }
        assert_eq!(cache.take(&[1]), Some(vec![1; 4]));
        assert_eq!(
            cache.take(&[1]),
            None,
            "a taken session is gone (0-RTT is single-use)"
        );
        assert_eq!(cache.get(&[0]), Some(vec![0; 4]));
        cache.put(vec![3], vec![3; 4]);
        cache.put(vec![4], vec![4; 4]);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get(&[0]), None, "the oldest live session was evicted");
        assert!(cache.get(&[2]).is_some() && cache.get(&[4]).is_some());
        // Overwriting keeps one entry, at its new age.
        cache.put(vec![2], vec![9; 4]);
        cache.put(vec![5], vec![5; 4]);
        assert_eq!(cache.get(&[2]), Some(vec![9; 4]));
        assert_eq!(cache.get(&[3]), None);
        // Churn never lets the queue grow past twice the maximum.
        for id in 0..10_000u32 {
            cache.put(id.to_be_bytes().to_vec(), vec![]);
            cache.take(&id.to_be_bytes());
        }
        assert!(cache.lock().order.len() <= 6);
        assert!(cache.len() <= 3);
    }

    /// Two quinn-proto endpoints joined in memory: what one sends, the other receives.
    struct Pair {
        server: quinn_proto::Endpoint,
        client: quinn_proto::Endpoint,
        server_conn: Option<(quinn_proto::ConnectionHandle, quinn_proto::Connection)>,
        client_conn: (quinn_proto::ConnectionHandle, quinn_proto::Connection),
        client_config: quinn_proto::ClientConfig,
        /// The server's TLS session cache.
        sessions: Arc<SessionCache>,
        /// The server's certificate and key, for a restarted server.
        identity: Identity,
        now: std::time::Instant,
    }

    const SERVER_ADDR: &str = "127.0.0.1:4433";
    const CLIENT_ADDR: &str = "127.0.0.1:50000";

    impl Pair {
        fn new() -> Pair {
            Pair::with_client_transport(quinn_proto::TransportConfig::default())
        }

        /// A pair whose client connects with `transport`.
        fn with_client_transport(transport: quinn_proto::TransportConfig) -> Pair {
            Pair::with_certificate(transport, DevCertKey::Ed25519)
        }

        /// A pair whose server's certificate has a `key` key.
        fn with_certificate(transport: quinn_proto::TransportConfig, key: DevCertKey) -> Pair {
            let (cert_pem, key_pem) = generate_dev_cert(key, vec!["localhost".into()]).unwrap();
            let identity = Identity {
                certs: rustls_pemfile::certs(&mut cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap(),
                key: rustls_pemfile::private_key(&mut key_pem.as_bytes())
                    .unwrap()
                    .unwrap(),
            };
            let kept = Identity {
                certs: identity.certs.clone(),
                key: identity.key.clone_key(),
            };
            let (server_config, sessions) =
                server_config(&Config::default(), identity, None).unwrap();
            let mut roots = rustls::RootCertStore::empty();
            roots.add(kept.certs[0].clone()).unwrap();
            let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            tls.alpn_protocols = vec![courier_protocol::ALPN.to_vec()];
            tls.enable_early_data = true;
            let crypto =
                quinn_proto::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
            let mut client_config = quinn_proto::ClientConfig::new(Arc::new(crypto));
            client_config.transport_config(Arc::new(transport));
            let endpoint_config = Arc::new(quinn_proto::EndpointConfig::default());
            let server = quinn_proto::Endpoint::new(
                endpoint_config.clone(),
                Some(server_config),
                true,
                None,
            );
            let mut client = quinn_proto::Endpoint::new(endpoint_config, None, true, None);
            let now = std::time::Instant::now();
            let client_conn = client
                .connect(
                    now,
                    client_config.clone(),
                    SERVER_ADDR.parse().unwrap(),
                    "localhost",
                )
                .unwrap();
            Pair {
                server,
                client,
                server_conn: None,
                client_conn,
                client_config,
                sessions,
                identity: kept,
                now,
            }
        }

        /// Replaces the server with a new one of the same certificate, as a restarted edge
        /// process, whose session cache `restore` fills (or leaves empty).
        fn restart_server(&mut self, restore: impl FnOnce(&SessionCache)) {
            let identity = Identity {
                certs: self.identity.certs.clone(),
                key: self.identity.key.clone_key(),
            };
            let (server_config, sessions) =
                server_config(&Config::default(), identity, None).unwrap();
            restore(&sessions);
            self.server = quinn_proto::Endpoint::new(
                Arc::new(quinn_proto::EndpointConfig::default()),
                Some(server_config),
                true,
                None,
            );
            self.server_conn = None;
            self.sessions = sessions;
        }

        /// A new connection from the same client (with the tickets it was given).
        fn reconnect(&mut self) {
            self.client_conn = self
                .client
                .connect(
                    self.now,
                    self.client_config.clone(),
                    SERVER_ADDR.parse().unwrap(),
                    "localhost",
                )
                .unwrap();
            self.server_conn = None;
        }

        fn server_conn(&mut self) -> &mut quinn_proto::Connection {
            &mut self.server_conn.as_mut().expect("the server accepted").1
        }

        /// Hands one datagram of the client to the server, which may accept a new connection
        /// from it; returns whether it reached a server connection.
        fn deliver_to_server(&mut self, datagram: &[u8]) -> bool {
            let mut response = Vec::new();
            match self.server.handle(
                self.now,
                CLIENT_ADDR.parse().unwrap(),
                None,
                None,
                bytes::BytesMut::from(datagram),
                &mut response,
            ) {
                Some(quinn_proto::DatagramEvent::NewConnection(incoming)) => {
                    let accepted = self
                        .server
                        .accept(incoming, self.now, &mut response, None)
                        .unwrap();
                    self.server_conn = Some(accepted);
                    true
                }
                Some(quinn_proto::DatagramEvent::ConnectionEvent(_, event)) => {
                    self.server_conn().handle_event(event);
                    true
                }
                _ => false,
            }
        }

        /// Hands one datagram of the server to the client; returns whether it reached the
        /// client's connection.
        fn deliver_to_client(&mut self, datagram: &[u8]) -> bool {
            let mut response = Vec::new();
            let Some(quinn_proto::DatagramEvent::ConnectionEvent(_, event)) = self.client.handle(
                self.now,
                SERVER_ADDR.parse().unwrap(),
                None,
                None,
                bytes::BytesMut::from(datagram),
                &mut response,
            ) else {
                return false;
            };
            self.client_conn.1.handle_event(event);
            true
        }

        /// Moves datagrams both ways until neither side sends, at most `rounds_max` times.
        fn drive(&mut self, rounds_max: usize) {
            let mut buf = Vec::new();
            for _ in 0..rounds_max {
                self.now += Duration::from_millis(1);
                let mut sent = false;
                // Client to server.
                loop {
                    buf.clear();
                    let Some(transmit) = self.client_conn.1.poll_transmit(self.now, 1, &mut buf)
                    else {
                        break;
                    };
                    sent = true;
                    self.deliver_to_server(&buf[..transmit.size]);
                }
                // Server to client.
                loop {
                    buf.clear();
                    let now = self.now;
                    let Some(transmit) = self
                        .server_conn
                        .as_mut()
                        .and_then(|(_, conn)| conn.poll_transmit(now, 1, &mut buf))
                    else {
                        break;
                    };
                    sent = true;
                    self.deliver_to_client(&buf[..transmit.size]);
                }
                // Endpoint events (connection ids) and timers, both sides.
                let (handle, conn) = &mut self.client_conn;
                while let Some(event) = conn.poll_endpoint_events() {
                    if let Some(event) = self.client.handle_event(*handle, event) {
                        conn.handle_event(event);
                    }
                }
                conn.handle_timeout(self.now);
                while conn.poll().is_some() {}
                if let Some((handle, conn)) = self.server_conn.as_mut() {
                    while let Some(event) = conn.poll_endpoint_events() {
                        if let Some(event) = self.server.handle_event(*handle, event) {
                            conn.handle_event(event);
                        }
                    }
                    conn.handle_timeout(self.now);
                    while conn.poll().is_some() {}
                }
                if !sent {
                    return;
                }
            }
        }
    }

    /// What stream `id` of `conn` has received so far.
    fn read_available(conn: &mut quinn_proto::Connection, id: quinn_proto::StreamId) -> Vec<u8> {
        let mut received = Vec::new();
        let mut recv = conn.recv_stream(id);
        let mut chunks = recv.read(true).unwrap();
        while let Ok(Some(chunk)) = chunks.next(usize::MAX) {
            received.extend_from_slice(&chunk.bytes);
        }
        let _ = chunks.finalize();
        received
    }

    /// The server drops its rustls connection once the handshake is over (the vendored
    /// quinn-proto's `TlsSession::release_finished_server`, ~3.7 KB per idle connection), and
    /// the connection goes on working: it still names its ALPN, carries stream data, takes
    /// key updates from either side (which need only the secrets the session kept), and the
    /// session tickets written just before the release reach the client, which resumes with
    /// 0-RTT.
    #[test]
    fn a_server_connection_releases_its_tls_state_and_keeps_working() {
        let mut pair = Pair::new();
        pair.drive(100);
        assert!(
            !pair.client_conn.1.is_handshaking(),
            "the handshake finished"
        );
        assert!(!pair.client_conn.1.is_closed() && !pair.server_conn().is_closed());
        let mut exported = [0u8; 32];
        assert!(
            pair.client_conn
                .1
                .crypto_session()
                .export_keying_material(&mut exported, b"courier", b"test")
                .is_ok(),
            "the client keeps its TLS state"
        );
        let server = pair.server_conn();
        assert!(!server.is_handshaking());
        assert!(
            server
                .crypto_session()
                .export_keying_material(&mut exported, b"courier", b"test")
                .is_err(),
            "the server released its TLS state"
        );
        let data = server
            .crypto_session()
            .handshake_data()
            .expect("handshake data is kept")
            .downcast::<quinn_proto::crypto::rustls::HandshakeData>()
            .unwrap();
        assert_eq!(data.protocol.as_deref(), Some(courier_protocol::ALPN));

        // A key update, then stream data under the new keys.
        pair.client_conn.1.force_key_update();
        let stream = pair
            .client_conn
            .1
            .streams()
            .open(quinn_proto::Dir::Bi)
            .unwrap();
        pair.client_conn
            .1
            .send_stream(stream)
            .write(b"after the handshake")
            .unwrap();
        pair.drive(100);
        let server = pair.server_conn();
        let accepted = server.streams().accept(quinn_proto::Dir::Bi).unwrap();
        assert_eq!(read_available(server, accepted), b"after the handshake");
        assert!(!server.is_closed(), "the client's key update was taken");

        // The server updates its keys, then answers on the stream.
        server.force_key_update();
        server
            .send_stream(accepted)
            .write(b"from the server")
            .unwrap();
        pair.drive(100);
        let client = &mut pair.client_conn.1;
        assert_eq!(read_available(client, stream), b"from the server");
        assert!(!client.is_closed() && !pair.server_conn().is_closed());

        // The tickets arrived: the next connection resumes with 0-RTT.
        pair.reconnect();
        assert!(
            pair.client_conn.1.has_0rtt(),
            "the client holds a ticket that allows 0-RTT"
        );
        pair.drive(100);
        assert!(!pair.client_conn.1.is_handshaking());
        assert!(pair.client_conn.1.accepted_0rtt(), "the server resumed it");
    }

    /// An idle client's keep-alive is acknowledged by the edge in the same wake-up that
    /// receives it: the client asks for it with IMMEDIATE_ACK (a vendor patch of quinn-proto,
    /// vendor/README.md) instead of a PING, which the edge acknowledged only when its
    /// delayed-acknowledgement timer fired, a wake-up of its own per keep-alive.
    #[test]
    fn an_idle_clients_keep_alive_is_acknowledged_in_the_wake_up_that_receives_it() {
        let keep_alive = Duration::from_millis(200);
        let mut transport = quinn_proto::TransportConfig::default();
        transport.keep_alive_interval(Some(keep_alive));
        transport.ack_frequency_config(Some(quinn_proto::AckFrequencyConfig::default()));
        let mut pair = Pair::with_client_transport(transport);
        pair.drive(100);
        assert!(
            !pair.client_conn.1.is_handshaking(),
            "the handshake finished"
        );
        // Past every delayed acknowledgement (25 ms): the client's next timer is its keep-alive.
        let settle = |pair: &mut Pair| (0..60).for_each(|_| pair.drive(1));
        settle(&mut pair);
        let mut buf = Vec::new();
        for keep_alive_index in 0..3 {
            // Idle until the client's keep-alive is due: nothing to send before.
            let due = pair
                .client_conn
                .1
                .poll_timeout()
                .expect("a keep-alive timer");
            assert!(
                due <= pair.now + keep_alive,
                "the next timer is the keep-alive"
            );
            let sent_before = pair.client_conn.1.stats().frame_tx;
            pair.now = due;
            let now = pair.now;
            pair.client_conn.1.handle_timeout(now);
            buf.clear();
            let transmit = pair
                .client_conn
                .1
                .poll_transmit(now, 1, &mut buf)
                .expect("the keep-alive");
            let sent = pair.client_conn.1.stats().frame_tx;
            assert_eq!(
                (sent.immediate_ack, sent.ping),
                (sent_before.immediate_ack + 1, sent_before.ping),
                "keep-alive {keep_alive_index} is one IMMEDIATE_ACK, no PING"
            );
            assert!(
                pair.deliver_to_server(&buf[..transmit.size]),
                "the keep-alive reaches the server's connection"
            );
            buf.clear();
            let transmit = pair
                .server_conn()
                .poll_transmit(now, 1, &mut buf)
                .unwrap_or_else(|| {
                    panic!(
                        "keep-alive {keep_alive_index}: the server acknowledges it at once, not \
                         at its delayed-acknowledgement timer"
                    )
                });
            assert!(
                pair.deliver_to_client(&buf[..transmit.size]),
                "the acknowledgement reaches the client's connection"
            );
            // Acknowledged: nothing in flight, so no probe timer, only the next keep-alive.
            assert_eq!(
                pair.client_conn.1.poll_timeout(),
                Some(now + keep_alive),
                "keep-alive {keep_alive_index} was acknowledged"
            );
        }
        assert!(!pair.client_conn.1.is_closed() && !pair.server_conn().is_closed());
    }

    /// The edge generates an Ed25519 development certificate (the cheapest signature per full
    /// handshake, decision 0037), signed by aws-lc's key provider, and a start that crashed
    /// while writing it leaves nothing the next start trips on; an ECDSA P-256 one works as
    /// well. Both complete a handshake and resume with a client whose provider verifies
    /// signatures as the SDK's does (ring's algorithms).
    #[test]
    fn a_generated_certificate_of_either_key_type_completes_handshakes() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.server.data_dir = dir.path().to_path_buf();
        let (identity, generated) = load_identity(&config).unwrap();
        assert!(generated, "a first start generates the certificate");
        let signing = certified_key(identity, &crypto_provider()).unwrap();
        assert_eq!(
            signing.key.algorithm(),
            rustls::SignatureAlgorithm::ED25519,
            "the development certificate is Ed25519"
        );
        let (_, generated) = load_identity(&config).unwrap();
        assert!(!generated, "the next start reads the same certificate");

        // A first start that crashed between its two renames: a key without its certificate,
        // and a torn temporary file. The next start makes a new pair that fits together.
        let (cert_path, key_path) = dev_cert_paths(&config);
        std::fs::remove_file(&cert_path).unwrap();
        let torn = cert_path.with_file_name("cert.pem.tmp");
        std::fs::write(&torn, b"-----BEGIN CERT").unwrap();
        let (identity, generated) = load_identity(&config).unwrap();
        assert!(generated, "a lone key is replaced by a new pair");
        certified_key(identity, &crypto_provider()).expect("the new pair fits together");
        assert!(!torn.exists(), "the temporary file is gone");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the key is its owner's alone");

        for key in [DevCertKey::Ed25519, DevCertKey::EcdsaP256] {
            let mut pair = Pair::with_certificate(quinn_proto::TransportConfig::default(), key);
            pair.drive(100);
            assert!(
                !pair.client_conn.1.is_handshaking() && !pair.client_conn.1.is_closed(),
                "{key:?}: the handshake finished"
            );
            pair.reconnect();
            pair.drive(100);
            assert!(
                pair.client_conn.1.accepted_0rtt(),
                "{key:?}: the client resumed"
            );
        }
    }

    /// Every handshake, full or resumed, leaves one session in the cache: a client resumes
    /// with its newest ticket, so a second ticket per handshake would only fill the cache with
    /// spares and halve the devices it remembers. The client still resumes each time.
    #[test]
    fn each_handshake_caches_one_session_and_the_client_resumes_with_it() {
        let mut pair = Pair::new();
        pair.drive(100);
        assert!(
            !pair.client_conn.1.is_handshaking(),
            "the handshake finished"
        );
        assert_eq!(pair.sessions.len(), 1, "one ticket, one cached session");
        for round in 0..3 {
            pair.reconnect();
            assert!(
                pair.client_conn.1.has_0rtt(),
                "round {round}: the client holds a ticket"
            );
            pair.drive(100);
            assert!(
                pair.client_conn.1.accepted_0rtt(),
                "round {round}: the server resumed it"
            );
            assert_eq!(
                pair.sessions.len(),
                1,
                "round {round}: the resumption took its session and cached one new one"
            );
        }
    }

    /// Sessions saved under one set of transport parameters are not restored under another:
    /// a client that resumed one with 0-RTT would find a limit it cached lowered and close the
    /// connection (quinn's `validate_resumption_from`), its session used up. The certificates
    /// alone decided before, so a restart that lowered a window failed every such client.
    #[test]
    fn saved_sessions_are_dropped_when_the_transport_parameters_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions");
        let mut pair = Pair::new();
        pair.drive(100);
        let certs = [pair.identity.certs.as_slice()];
        let config = Config::default();
        let saved_under = sessions_fingerprint(certs, &config);
        assert_eq!(saved_under, sessions_fingerprint(certs, &config));
        let mut smaller = Config::default();
        smaller.quic.stream_receive_window_bytes /= 2;
        let started_under = sessions_fingerprint(certs, &smaller);
        assert_ne!(saved_under, started_under);
        assert_eq!(pair.sessions.save(&path, &saved_under).unwrap(), 1);
        pair.restart_server(|sessions| {
            assert!(
                sessions.restore(&path, &started_under).is_err(),
                "sessions saved under other transport parameters were restored"
            );
            assert!(sessions.is_empty());
        });
        pair.reconnect();
        pair.drive(100);
        assert!(
            !pair.client_conn.1.accepted_0rtt(),
            "no 0-RTT on a session the server no longer has"
        );
        assert!(
            !pair.client_conn.1.is_handshaking(),
            "a full handshake instead"
        );
    }

    /// A stopping edge saves its sessions and the next process resumes them: its clients
    /// reconnect with 0-RTT instead of a full handshake. A process that starts without them
    /// (a kill saves nothing) refuses the same tickets, and the saved file is used only once.
    #[test]
    fn saved_sessions_resume_with_0rtt_after_a_restart_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions");
        let mut pair = Pair::new();
        pair.drive(100);
        assert_eq!(pair.sessions.len(), 1);
        let fingerprint = certificates_fingerprint([pair.identity.certs.as_slice()]);
        assert_eq!(pair.sessions.save(&path, &fingerprint).unwrap(), 1);
        assert!(
            pair.sessions.is_empty(),
            "saving empties the cache: no handshake still running can resume a saved session"
        );

        pair.restart_server(|sessions| {
            assert_eq!(sessions.restore(&path, &fingerprint), Ok(1));
        });
        assert!(
            !path.exists(),
            "the saved file is deleted as it is restored"
        );
        pair.reconnect();
        assert!(pair.client_conn.1.has_0rtt());
        pair.drive(100);
        assert!(
            !pair.client_conn.1.is_handshaking(),
            "the resumed handshake finished"
        );
        assert!(
            pair.client_conn.1.accepted_0rtt(),
            "the restarted server resumed the saved session with 0-RTT"
        );

        // The same client, its newest ticket saved again, then a start that finds no file
        // (the one before already used it): the ticket is refused, a full handshake follows.
        pair.sessions.save(&path, &fingerprint).unwrap();
        pair.restart_server(|sessions| {
            assert_eq!(sessions.restore(&path, &fingerprint), Ok(1));
        });
        pair.restart_server(|sessions| {
            assert_eq!(
                sessions.restore(&path, &fingerprint),
                Ok(0),
                "a saved file is used once"
            );
        });
        pair.reconnect();
        assert!(pair.client_conn.1.has_0rtt());
        pair.drive(100);
        assert!(!pair.client_conn.1.is_handshaking());
        assert!(
            !pair.client_conn.1.accepted_0rtt(),
            "without the saved sessions the server refuses the ticket"
        );
    }

    /// A saved file restores only when it is whole and of the same certificates, is deleted
    /// either way, and refills the cache oldest first within its bound.
    #[test]
    fn a_torn_altered_or_foreign_session_file_restores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions");
        let fingerprint = [7u8; 32];
        let saved = SessionCache::new(10);
        for id in 0..5u8 {
            saved.put(vec![id; 32], vec![id; 300]);
        }
        saved.take(&[2; 32]);
        assert_eq!(saved.save(&path, &fingerprint), Ok(4));
        let whole = std::fs::read(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "resumption secrets are private");
        }

        let small = SessionCache::new(3);
        assert_eq!(small.restore(&path, &fingerprint), Ok(3));
        assert!(small.get(&[0; 32]).is_none(), "the oldest went first");
        for id in [1u8, 3, 4] {
            assert_eq!(small.get(&[id; 32]), Some(vec![id; 300]));
        }
        assert!(
            small.get(&[2; 32]).is_none(),
            "a taken session is not saved"
        );

        let cases: [(&str, Vec<u8>, [u8; 32]); 4] = [
            ("other certificates", whole.clone(), [8u8; 32]),
            ("torn", whole[..whole.len() - 100].to_vec(), fingerprint),
            (
                "altered",
                {
                    let mut altered = whole.clone();
                    altered[60] ^= 1;
                    altered
                },
                fingerprint,
            ),
            ("empty", Vec::new(), fingerprint),
        ];
        for (case, bytes, fingerprint) in cases {
            std::fs::write(&path, &bytes).unwrap();
            let cache = SessionCache::new(10);
            assert!(cache.restore(&path, &fingerprint).is_err(), "{case}");
            assert!(cache.is_empty(), "{case}: nothing restored");
            assert!(!path.exists(), "{case}: the file is deleted");
        }
    }

    /// A saved file's body with a checksum made for it: what the parser sees past the
    /// checksum, so that its own checks are tested.
    fn checksummed(body: &[u8]) -> Vec<u8> {
        let mut bytes = body.to_vec();
        bytes.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, body).as_ref());
        bytes
    }

    fn saved_header(fingerprint: &[u8; 32], count: u32) -> Vec<u8> {
        let mut body = SAVED_SESSIONS_MAGIC.to_vec();
        body.extend_from_slice(fingerprint);
        body.extend_from_slice(&count.to_le_bytes());
        body
    }

    fn saved_entry(id: &[u8], made_at_secs: u64, value: &[u8]) -> Vec<u8> {
        let mut entry = vec![id.len() as u8];
        entry.extend_from_slice(id);
        entry.extend_from_slice(&made_at_secs.to_le_bytes());
        entry.extend_from_slice(&(value.len() as u16).to_le_bytes());
        entry.extend_from_slice(value);
        entry
    }

    /// Past the checksum the parser still refuses whatever does not add up: a length that
    /// runs past the end, a session over the limit, a count that does not match, another
    /// format; and no input makes it panic.
    #[test]
    fn the_saved_session_parser_refuses_bodies_that_do_not_add_up() {
        let fingerprint = [3u8; 32];
        let now = unix_now_secs();
        let mut good = saved_header(&fingerprint, 2);
        good.extend(saved_entry(&[1; 32], now, &[9; 100]));
        good.extend(saved_entry(&[2; 32], now, &[8; 50]));
        let good_file = checksummed(&good);
        let parsed = parse_saved_sessions(&good_file, &fingerprint, 2).unwrap();
        assert_eq!(
            parse_saved_sessions(&good_file, &fingerprint, 1)
                .unwrap()
                .iter()
                .map(|session| session.id)
                .collect::<Vec<_>>(),
            vec![&[2u8; 32][..]],
            "past the cache's size only the newest are collected"
        );
        assert_eq!(
            parsed,
            vec![
                SavedSession {
                    id: &[1; 32],
                    made_at_secs: now,
                    value: &[9; 100]
                },
                SavedSession {
                    id: &[2; 32],
                    made_at_secs: now,
                    value: &[8; 50]
                },
            ]
        );
        let mut wrong_count = saved_header(&fingerprint, 3);
        wrong_count.extend_from_slice(&good[SAVED_COUNT_AT + 4..]);
        let mut overrun = good.clone();
        overrun.truncate(overrun.len() - 1);
        let mut too_long = saved_header(&fingerprint, 1);
        too_long.extend(saved_entry(
            &[1; 32],
            now,
            &vec![0; SAVED_SESSION_BYTES_MAX + 1],
        ));
        let mut other_format = good.clone();
        other_format[..8].copy_from_slice(b"CRSESS01");
        for (case, body) in [
            ("a count that does not match", wrong_count),
            ("a length past the end", overrun),
            ("a session over the limit", too_long),
            ("another format", other_format),
        ] {
            assert!(
                parse_saved_sessions(&checksummed(&body), &fingerprint, 10).is_err(),
                "{case}"
            );
        }
        // Arbitrary bodies behind a valid checksum: refused or parsed, never a panic.
        let mut rng = courier_core::rng::Rng::new(7);
        for _ in 0..20_000 {
            let mut body = saved_header(&fingerprint, rng.below(4) as u32);
            for _ in 0..rng.below(64) {
                body.push(rng.below(256) as u8);
            }
            let _ = parse_saved_sessions(&checksummed(&body), &fingerprint, 10);
        }
    }

    /// Only a regular file is read back: a link (or a FIFO, whose open would block the start)
    /// in its place is deleted unread.
    #[test]
    fn a_saved_sessions_path_that_is_not_a_file_is_deleted_unread() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"not sessions").unwrap();
        let path = dir.path().join("sessions");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let cache = SessionCache::new(10);
        let error = cache.restore(&path, &[5u8; 32]).unwrap_err();
        assert!(error.contains("not a regular file"), "{error}");
        assert!(
            std::fs::symlink_metadata(&path).is_err(),
            "the link is gone"
        );
        assert!(target.exists(), "what it pointed to is untouched");
    }

    /// A session older than a ticket's lifetime is neither saved nor restored: saving does
    /// not let sessions outlive the process that made them by more than that.
    #[test]
    fn sessions_older_than_a_ticket_lifetime_are_not_saved_or_restored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions");
        let fingerprint = [5u8; 32];
        let now = unix_now_secs();
        let too_old = now - SAVED_SESSION_AGE_SECS_MAX - 1;
        let cache = SessionCache::new(10);
        cache.put_made_at(vec![1; 32], vec![1; 10], too_old);
        cache.put_made_at(vec![2; 32], vec![2; 10], now - 60);
        assert_eq!(cache.get(&[1; 32]), None, "nor resumed");
        assert_eq!(cache.save(&path, &fingerprint), Ok(1));
        let restored = SessionCache::new(10);
        assert_eq!(restored.restore(&path, &fingerprint), Ok(1));
        assert!(restored.get(&[2; 32]).is_some());
        // Restored, a session keeps its age.
        assert_eq!(
            restored.lock().sessions[&vec![2u8; 32]].made_at_secs,
            now - 60
        );

        let mut body = saved_header(&fingerprint, 2);
        body.extend(saved_entry(&[3; 32], too_old, &[3; 10]));
        body.extend(saved_entry(&[4; 32], now, &[4; 10]));
        std::fs::write(&path, checksummed(&body)).unwrap();
        let cache = SessionCache::new(10);
        assert_eq!(cache.restore(&path, &fingerprint), Ok(1));
        assert!(cache.get(&[3; 32]).is_none(), "the old one is dropped");
        assert!(cache.get(&[4; 32]).is_some());
    }

    /// A file larger than the cache's sessions can be is refused before it is parsed, and a
    /// save's leftover temporary file is deleted by the next restore.
    #[test]
    fn an_oversized_file_restores_nothing_and_leftovers_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions");
        let fingerprint = [6u8; 32];
        let cache = SessionCache::new(1);
        let bound = SAVED_COUNT_AT
            + 4
            + 32
            + SAVED_SESSION_OVERHEAD_BYTES
            + SAVED_SESSION_ID_BYTES_MAX
            + SAVED_SESSION_BYTES_MAX;
        std::fs::write(&path, vec![0u8; bound + 1]).unwrap();
        std::fs::write(saving_path(&path), b"a save cut short").unwrap();
        let refused = cache.restore(&path, &fingerprint).unwrap_err();
        assert!(refused.contains("larger than"), "{refused}");
        assert!(!path.exists() && !saving_path(&path).exists());
        assert!(cache.is_empty());
    }

    /// A delayed acknowledgement leaves when the edge asks for it within the window it names,
    /// and not before (`Connection::send_delayed_ack_due_by`, a vendor patch of quinn-proto,
    /// vendor/README.md): a shard awake for other work sends an acknowledgement due soon
    /// instead of waking again for its timer, and never one due later than it asked about.
    #[test]
    fn a_delayed_acknowledgement_leaves_early_only_when_due_within_the_window() {
        let mut pair = Pair::new();
        pair.drive(100);
        assert!(
            !pair.client_conn.1.is_handshaking(),
            "the handshake finished"
        );
        let stream = pair
            .client_conn
            .1
            .streams()
            .open(quinn_proto::Dir::Bi)
            .unwrap();
        let mut buf = Vec::new();
        // One ack-eliciting packet the server acknowledges after a delay. quinn skips packet
        // numbers at random (against optimistic acknowledgements), and the server acknowledges
        // a packet after a gap at once: then the next packet is tried.
        let mut attempts = 0;
        let (now, due) = loop {
            attempts += 1;
            assert!(attempts <= 10, "ten packets in a row acknowledged at once");
            // Past every delayed acknowledgement so far.
            (0..60).for_each(|_| pair.drive(1));
            pair.client_conn
                .1
                .send_stream(stream)
                .write(b"one ack-eliciting packet")
                .unwrap();
            let now = pair.now;
            buf.clear();
            let transmit = pair
                .client_conn
                .1
                .poll_transmit(now, 1, &mut buf)
                .expect("the stream data");
            assert!(pair.deliver_to_server(&buf[..transmit.size]));
            let server = pair.server_conn();
            let due = server
                .poll_timeout()
                .expect("a delayed-acknowledgement timer");
            buf.clear();
            match server.poll_transmit(now, 1, &mut buf) {
                None => break (now, due),
                Some(transmit) => {
                    let datagram = buf[..transmit.size].to_vec();
                    pair.deliver_to_client(&datagram);
                }
            }
        };
        assert!(
            due > now,
            "one packet is acknowledged after a delay, not at once"
        );
        let server = pair.server_conn();
        let acks_before = server.stats().frame_tx.acks;

        let short = due - now - Duration::from_millis(1);
        assert!(
            !server.send_delayed_ack_due_by(now + short),
            "an acknowledgement due later than the window stays delayed"
        );
        buf.clear();
        assert!(server.poll_transmit(now, 1, &mut buf).is_none());
        assert_eq!(server.poll_timeout(), Some(due), "its timer is unchanged");

        assert!(
            server.send_delayed_ack_due_by(due),
            "an acknowledgement due within the window is sent"
        );
        buf.clear();
        let transmit = server
            .poll_transmit(now, 1, &mut buf)
            .expect("the acknowledgement, now");
        assert_eq!(server.stats().frame_tx.acks, acks_before + 1);
        assert!(
            server.poll_timeout().is_none_or(|next| next > due),
            "its timer is gone"
        );
        assert!(
            !server.send_delayed_ack_due_by(due),
            "nothing left to acknowledge"
        );
        let client_acks_before = pair.client_conn.1.stats().frame_rx.acks;
        assert!(pair.deliver_to_client(&buf[..transmit.size]));
        assert_eq!(
            pair.client_conn.1.stats().frame_rx.acks,
            client_acks_before + 1,
            "the client received it"
        );
    }

    /// A stream write the edge's send window cut short leaves the stream registered for a
    /// `Writable` event, which comes once acknowledgements free the window
    /// (`shard::write_outbuf`). The shard stops reading a connection whose answers fill its
    /// outbound buffer and reads it again on that event; quinn raises it only for a stream
    /// whose write was refused, so after a partial write alone it never came.
    #[test]
    fn a_write_cut_short_by_the_send_window_is_told_when_there_is_room() {
        let mut pair = Pair::new();
        pair.drive(100);
        let client_stream = pair
            .client_conn
            .1
            .streams()
            .open(quinn_proto::Dir::Bi)
            .unwrap();
        pair.client_conn
            .1
            .send_stream(client_stream)
            .write(b"open")
            .unwrap();
        pair.drive(10);
        let stream = pair
            .server_conn()
            .streams()
            .accept(quinn_proto::Dir::Bi)
            .expect("the client's stream");
        // More than the edge's send window (and less than the client's stream window, so
        // that the edge's own window is what cuts the write short).
        let send_window = Config::default().quic.send_window_bytes as usize;
        let mut outbuf = vec![7u8; send_window + 100_000];
        crate::shard::write_outbuf(pair.server_conn(), stream, &mut outbuf).unwrap();
        assert_eq!(outbuf.len(), 100_000, "the send window took what it holds");

        let mut writable = false;
        let mut buf = Vec::new();
        for _ in 0..2_000 {
            pair.now += Duration::from_millis(1);
            let now = pair.now;
            while let Some(transmit) = {
                buf.clear();
                pair.server_conn().poll_transmit(now, 1, &mut buf)
            } {
                pair.deliver_to_client(&buf[..transmit.size]);
            }
            read_available(&mut pair.client_conn.1, stream);
            while let Some(transmit) = {
                buf.clear();
                pair.client_conn.1.poll_transmit(now, 1, &mut buf)
            } {
                pair.deliver_to_server(&buf[..transmit.size]);
            }
            let server = pair.server_conn();
            server.handle_timeout(now);
            while let Some(event) = server.poll() {
                writable |= matches!(
                    event,
                    quinn_proto::Event::Stream(quinn_proto::StreamEvent::Writable { id })
                        if id == stream
                );
            }
            if writable {
                break;
            }
        }
        assert!(
            writable,
            "the stream was reported writable once the window had room"
        );
    }
}
