//! TLS 1.3 on rdmig's TCP connections (spec: section 1.3, TCP binding, "TLS"): mutual
//! authentication with x509 certificates in QEMU's `tls-creds-x509` layout, confidentiality
//! and integrity for every control frame and every byte of memory.
//!
//! Credentials (a directory, as QEMU's `dir=`): `ca-cert.pem` (the CA both sides trust),
//! `server-cert.pem` and `server-key.pem` (the destination), `client-cert.pem` and
//! `client-key.pem` (the source). The source checks the destination's name; the destination
//! requires a client certificate the CA signed.
//!
//! A [`TlsStream`] is shared by a connection's reading and writing threads: the rustls state
//! is locked only to decrypt or encrypt, never across a blocking socket call, and one writer at
//! a time puts records on the socket in the order they were sealed.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ServerConfig};

use crate::memory::ram::wait_readable;

/// The label of the exporter value that binds the protocol's AUTH to the TLS session (spec:
/// AUTH-1, channel binding).
const BINDING_LABEL: &[u8] = b"EXPORTER-rdmig/1 channel binding";

/// The files of a credentials directory.
pub const CA: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// ring: built from Rust and assembly with the C compiler every Rust toolchain has (no cmake
/// or Go as aws-lc-rs needs), so a fresh Debian machine builds it as it is.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let p = dir.join(name);
    let v: Vec<_> = CertificateDer::pem_file_iter(&p)
        .map_err(|e| format!("{}: {e}", p.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", p.display()))?;
    if v.is_empty() {
        return Err(format!("{}: no certificate in it", p.display()));
    }
    Ok(v)
}

fn key(dir: &Path, name: &str) -> Result<PrivateKeyDer<'static>, String> {
    let p = dir.join(name);
    PrivateKeyDer::from_pem_file(&p).map_err(|e| format!("{}: {e}", p.display()))
}

fn roots(dir: &Path) -> Result<rustls::RootCertStore, String> {
    let mut r = rustls::RootCertStore::empty();
    for c in certs(dir, CA)? {
        r.add(c)
            .map_err(|e| format!("{}: {e}", dir.join(CA).display()))?;
    }
    Ok(r)
}

/// The source's side: its certificate, the CA, and the name the destination must prove.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl ClientTls {
    pub fn load(dir: &Path, hostname: &str) -> Result<ClientTls, String> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots(dir)?)
            .with_client_auth_cert(certs(dir, CLIENT_CERT)?, key(dir, CLIENT_KEY)?)
            .map_err(|e| format!("{}: {e}", dir.join(CLIENT_KEY).display()))?;
        let name = ServerName::try_from(hostname.to_string())
            .map_err(|e| format!("--tls-hostname {hostname:?}: {e}"))?;
        Ok(ClientTls {
            config: Arc::new(config),
            name,
        })
    }
}

impl ClientTls {
    /// A client session of these credentials, for driving TLS by hand (the fuzz targets).
    pub(crate) fn connection(&self) -> Result<rustls::ClientConnection, rustls::Error> {
        rustls::ClientConnection::new(self.config.clone(), self.name.clone())
    }
}

/// The destination's side: its certificate, and the CA client certificates must chain to.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
}

impl ServerTls {
    pub fn load(dir: &Path) -> Result<ServerTls, String> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(dir)?),
            provider(),
        )
        .build()
        .map_err(|e| format!("{}: {e}", dir.join(CA).display()))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(dir, SERVER_CERT)?, key(dir, SERVER_KEY)?)
            .map_err(|e| format!("{}: {e}", dir.join(SERVER_KEY).display()))?;
        // Every connection is a fresh session; nothing to resume.
        config.send_tls13_tickets = 0;
        Ok(ServerTls {
            config: Arc::new(config),
        })
    }
}

/// A TLS connection over a TCP socket, usable from one reading and several writing threads.
/// Locks, always in this order: `inbuf`, `writing`, `conn`. A writer holds `writing` and
/// `conn` while its records go onto the socket (no copy of them).
pub struct TlsStream {
    sock: TcpStream,
    conn: Mutex<rustls::Connection>,
    /// Held while sealed records go onto the socket, so they go in sealing order.
    writing: Mutex<()>,
    /// Records read off the socket and not yet given to rustls: one system call takes up to
    /// [`INBUF`] bytes, many records (rustls alone would read 4 KiB at a time).
    inbuf: Mutex<InBuf>,
}

/// Bytes of records read ahead of rustls at most.
const INBUF: usize = 256 << 10;

struct InBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// Turns a rustls error into an I/O error with the one-line explanation an operator needs.
fn tls_error(e: rustls::Error) -> io::Error {
    use rustls::{CertificateError as C, Error as E};
    let why = match &e {
        E::InvalidCertificate(C::UnknownIssuer) | E::InvalidCertificate(C::BadSignature) => {
            "the peer's certificate is not signed by the CA in ca-cert.pem".to_string()
        }
        E::InvalidCertificate(C::Expired) | E::InvalidCertificate(C::ExpiredContext { .. }) => {
            "the peer's certificate has expired".to_string()
        }
        E::InvalidCertificate(C::NotValidYet)
        | E::InvalidCertificate(C::NotValidYetContext { .. }) => {
            "the peer's certificate is not valid yet (check both clocks)".to_string()
        }
        E::InvalidCertificate(C::NotValidForName)
        | E::InvalidCertificate(C::NotValidForNameContext { .. }) => {
            "the destination's certificate is not for this name (see --tls-hostname)".to_string()
        }
        E::NoCertificatesPresented => {
            "the source presented no client certificate (client-cert.pem)".to_string()
        }
        E::AlertReceived(a) => format!("the peer refused the TLS session ({a:?})"),
        E::InvalidMessage(_) => {
            "the peer does not speak TLS (a plaintext peer? both sides need --tls-creds)"
                .to_string()
        }
        E::DecryptError => "a TLS record failed its integrity check".to_string(),
        other => format!("TLS: {other}"),
    };
    io::Error::new(io::ErrorKind::InvalidData, why)
}

impl TlsStream {
    /// The source's end: a TLS 1.3 handshake on `sock`, finished by `deadline`.
    pub fn client(sock: TcpStream, tls: &ClientTls, deadline: Instant) -> io::Result<TlsStream> {
        let c = rustls::ClientConnection::new(tls.config.clone(), tls.name.clone())
            .map_err(tls_error)?;
        Self::handshake(sock, rustls::Connection::Client(c), deadline)
    }

    /// The destination's end: a TLS 1.3 handshake on `sock`, finished by `deadline`.
    pub fn server(sock: TcpStream, tls: &ServerTls, deadline: Instant) -> io::Result<TlsStream> {
        let c = rustls::ServerConnection::new(tls.config.clone()).map_err(tls_error)?;
        Self::handshake(sock, rustls::Connection::Server(c), deadline)
    }

    fn handshake(
        sock: TcpStream,
        conn: rustls::Connection,
        deadline: Instant,
    ) -> io::Result<TlsStream> {
        Self::handshake_io(sock, conn, deadline).map_err(|e| match e.kind() {
            // A reset or an end mid-handshake is most often a peer without TLS.
            io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof => io::Error::new(
                e.kind(),
                format!("{e} during the TLS handshake (does the peer use --tls-creds too?)"),
            ),
            _ => e,
        })
    }

    fn handshake_io(
        sock: TcpStream,
        mut conn: rustls::Connection,
        deadline: Instant,
    ) -> io::Result<TlsStream> {
        while conn.is_handshaking() {
            while conn.wants_write() {
                conn.write_tls(&mut &sock)?;
            }
            if !conn.is_handshaking() {
                break;
            }
            wait_readable(sock.as_fd(), deadline)?;
            if conn.read_tls(&mut &sock)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                ));
            }
            if let Err(e) = conn.process_new_packets() {
                // Tell the peer why (an alert), then fail.
                let _ = conn.write_tls(&mut &sock);
                return Err(tls_error(e));
            }
        }
        while conn.wants_write() {
            conn.write_tls(&mut &sock)?;
        }
        Ok(TlsStream {
            sock,
            conn: Mutex::new(conn),
            writing: Mutex::new(()),
            inbuf: Mutex::new(InBuf {
                buf: Vec::new(),
                start: 0,
                end: 0,
            }),
        })
    }

    /// The exporter value of this session that binds the protocol's AUTH to it.
    pub fn binding(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        self.conn
            .lock()
            .expect("not poisoned")
            .export_keying_material(&mut out, BINDING_LABEL, None)
            .expect("a finished TLS 1.3 session exports keying material");
        out
    }

    /// Seals `buf` and puts it on the socket, whole.
    pub fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        let _w = self.writing.lock().expect("not poisoned");
        let mut c = self.conn.lock().expect("not poisoned");
        // rustls takes at most its buffer limit (64 KiB) of plaintext per call: seal, put the
        // records on the socket, and go on.
        let mut rest = buf;
        while !rest.is_empty() {
            let n = c.writer().write(rest)?;
            while c.wants_write() {
                c.write_tls(&mut &self.sock)?;
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Puts whatever rustls has to say on the socket (alerts, replies after a read).
    fn flush(&self) -> io::Result<()> {
        let _w = self.writing.lock().expect("not poisoned");
        let mut sealed = Vec::new();
        {
            let mut c = self.conn.lock().expect("not poisoned");
            while c.wants_write() {
                c.write_tls(&mut sealed)?;
            }
        }
        if !sealed.is_empty() {
            (&self.sock).write_all(&sealed)?;
        }
        Ok(())
    }

    /// Reads some decrypted bytes, waiting until `deadline` (None: as long as it takes).
    /// `Ok(0)` is the peer's orderly close. Only the connection's one reading thread calls it.
    pub fn read_some(&self, buf: &mut [u8], deadline: Option<Instant>) -> io::Result<usize> {
        let mut inb = self.inbuf.lock().expect("not poisoned");
        loop {
            let fed = {
                let mut c = self.conn.lock().expect("not poisoned");
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                // No plaintext left: give rustls what was read ahead until a record opens
                // (it takes at most 4 KiB a call), or nothing is left.
                if inb.start < inb.end {
                    let InBuf { buf: b, start, end } = &mut *inb;
                    let mut r = Ok(false);
                    while *start < *end {
                        let n = c.read_tls(&mut &b[*start..*end])?;
                        *start += n;
                        match c.process_new_packets() {
                            Ok(st) if st.plaintext_bytes_to_read() > 0 || n == 0 => break,
                            Ok(_) => {}
                            Err(e) => {
                                r = Err(tls_error(e));
                                break;
                            }
                        }
                    }
                    if r.is_ok() {
                        r = Ok(c.wants_write());
                    }
                    Some(r)
                } else {
                    None
                }
            };
            match fed {
                Some(Ok(reply)) => {
                    // Alerts or key updates rustls wants to answer.
                    if reply {
                        self.flush()?;
                    }
                    continue;
                }
                Some(Err(e)) => {
                    let _ = self.flush();
                    return Err(e);
                }
                None => {}
            }
            match deadline {
                Some(d) => wait_readable(self.sock.as_fd(), d)?,
                // The wait for a message's first byte is the machines' to bound; wake now and
                // then only to stay interruptible by a socket shutdown.
                None => match wait_readable(
                    self.sock.as_fd(),
                    Instant::now() + Duration::from_secs(3600),
                ) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => continue,
                    Err(e) => return Err(e),
                },
            }
            if inb.buf.is_empty() {
                inb.buf = vec![0u8; INBUF];
            }
            let got = match (&self.sock).read(&mut inb.buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            (inb.start, inb.end) = (0, got);
            if got == 0 {
                // The socket ended: an end without close_notify is reported by `reader()`.
                let mut c = self.conn.lock().expect("not poisoned");
                let _ = c.read_tls(&mut io::empty());
                let _ = c.process_new_packets();
                return match c.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    }
                    Err(e) => Err(e),
                };
            }
        }
    }

    /// Ends the connection: close_notify first when closing for writing.
    /// Never waits: a writer blocked on a silent peer holds the locks, and shutting the socket
    /// is what ends its wait, so close_notify goes out only if nobody is writing and the
    /// socket takes it at once.
    pub fn shutdown(&self, how: Shutdown) {
        if how != Shutdown::Read {
            if let (Ok(_w), Ok(mut c)) = (self.writing.try_lock(), self.conn.try_lock()) {
                c.send_close_notify();
                let mut sealed = Vec::new();
                while c.wants_write() {
                    if c.write_tls(&mut sealed).is_err() {
                        break;
                    }
                }
                let _ = rustix::net::send(&self.sock, &sealed, rustix::net::SendFlags::DONTWAIT);
            }
        }
        let _ = self.sock.shutdown(how);
    }
}

/// `rdmig tls-init DIR`: a throwaway CA, a server certificate for `names` (host names or
/// addresses; `localhost`, 127.0.0.1 and ::1 always), and a client certificate, in QEMU's
/// layout. For tests and first steps; a deployment uses its own CA.
pub fn init(dir: &Path, names: &[String]) -> Result<Vec<PathBuf>, String> {
    generate(dir, names, |_| {})
}

/// [`init`], with `server` adjusting the destination certificate's parameters (tests make it
/// expired).
fn generate(
    dir: &Path,
    names: &[String],
    server: impl Fn(&mut rcgen::CertificateParams),
) -> Result<Vec<PathBuf>, String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let e = |e: rcgen::Error| format!("generating certificates: {e}");
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name = DistinguishedName::new();
    let mut tag = [0u8; 4];
    getrandom::fill(&mut tag).expect("the OS random source is available");
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("rdmig throwaway CA {:08x}", u32::from_le_bytes(tag)),
    );
    let ca_cert = ca.self_signed(&ca_key).map_err(e)?;
    let mut all: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    all.extend(names.iter().cloned());
    all.dedup();
    let leaf = |cn: &str,
                sans: Vec<String>,
                usage,
                adjust: &dyn Fn(&mut CertificateParams)|
     -> Result<(String, String), String> {
        let key = KeyPair::generate().map_err(e)?;
        let mut p = CertificateParams::new(sans).map_err(e)?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        adjust(&mut p);
        let c = p.signed_by(&key, &ca_cert, &ca_key).map_err(e)?;
        Ok((c.pem(), key.serialize_pem()))
    };
    let (server, server_key) = leaf(
        "rdmig destination",
        all,
        ExtendedKeyUsagePurpose::ServerAuth,
        &server,
    )?;
    let (client, client_key) = leaf(
        "rdmig source",
        vec!["rdmig-source".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
        &|_| {},
    )?;
    let files = [
        (CA, ca_cert.pem(), false),
        (SERVER_CERT, server, false),
        (SERVER_KEY, server_key, true),
        (CLIENT_CERT, client, false),
        (CLIENT_KEY, client_key, true),
    ];
    let mut written = Vec::new();
    for (name, pem, secret) in files {
        let p = dir.join(name);
        write_file(&p, pem.as_bytes(), secret)?;
        written.push(p);
    }
    Ok(written)
}

fn write_file(p: &Path, bytes: &[u8], secret: bool) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(p)
        .map_err(|e| format!("{}: {e}", p.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("{}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(dir: &Path, host: &str) -> (io::Result<TlsStream>, io::Result<TlsStream>) {
        let client = ClientTls::load(dir, host).unwrap();
        let server = ServerTls::load(dir).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            TlsStream::server(s, &server, deadline)
        });
        let c = TlsStream::client(TcpStream::connect(addr).unwrap(), &client, deadline);
        (c, t.join().unwrap())
    }

    /// A session between the generated credentials carries bytes both ways, and both ends
    /// export the same binding.
    #[test]
    fn tls_init_credentials_make_a_mutual_session() {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), &[]).unwrap();
        let (c, s) = pair(d.path(), "localhost");
        let (c, s) = (c.unwrap(), s.unwrap());
        c.write_all(b"hello over tls").unwrap();
        let mut buf = [0u8; 14];
        let mut got = 0;
        while got < buf.len() {
            got += s
                .read_some(
                    &mut buf[got..],
                    Some(Instant::now() + Duration::from_secs(5)),
                )
                .unwrap();
        }
        assert_eq!(&buf, b"hello over tls");
        assert_eq!(c.binding(), s.binding());
        c.shutdown(Shutdown::Write);
        assert_eq!(
            s.read_some(&mut buf, Some(Instant::now() + Duration::from_secs(5)))
                .unwrap(),
            0
        );
    }

    /// The destination's name is checked, and a CA the peer does not trust is refused.
    #[test]
    fn wrong_name_and_unknown_ca_are_refused() {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), &[]).unwrap();
        let (c, _) = pair(d.path(), "elsewhere.example");
        let e = c.err().expect("refused");
        assert!(e.to_string().contains("not for this name"), "{e}");
        // A second CA: the source trusts it, the destination's certificate is from the first.
        let other = tempfile::tempdir().unwrap();
        init(other.path(), &[]).unwrap();
        std::fs::copy(other.path().join(CA), d.path().join(CA)).unwrap();
        let (c, _) = pair(d.path(), "localhost");
        let e = c.err().expect("refused");
        assert!(e.to_string().contains("not signed by the CA"), "{e}");
    }

    fn secs(n: u64) -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(n))
    }

    /// A certificate outside its validity is refused with an error that says which way.
    #[test]
    fn an_expired_or_not_yet_valid_destination_certificate_is_refused() {
        let d = tempfile::tempdir().unwrap();
        generate(d.path(), &[], |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        })
        .unwrap();
        let (c, _) = pair(d.path(), "localhost");
        let e = c.err().expect("refused");
        assert!(e.to_string().contains("has expired"), "{e}");
        // And one whose validity has not begun (a clock behind).
        generate(d.path(), &[], |p| {
            p.not_before = rcgen::date_time_ymd(2090, 1, 1);
            p.not_after = rcgen::date_time_ymd(2091, 1, 1);
        })
        .unwrap();
        let (c, _) = pair(d.path(), "localhost");
        let e = c.err().expect("refused");
        assert!(e.to_string().contains("not valid yet"), "{e}");
    }

    /// A source without a client certificate does not get a session.
    #[test]
    fn a_source_without_a_client_certificate_is_refused() {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), &[]).unwrap();
        let server = ServerTls::load(d.path()).unwrap();
        let anonymous = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots(d.path()).unwrap())
            .with_no_client_auth();
        let client = ClientTls {
            config: Arc::new(anonymous),
            name: ServerName::try_from("localhost").unwrap(),
        };
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            TlsStream::server(s, &server, secs(5).unwrap())
        });
        // TLS 1.3: the client finishes its side before the server judges its certificate;
        // its first read then sees the server's alert.
        let c = TlsStream::client(TcpStream::connect(addr).unwrap(), &client, secs(5).unwrap());
        let e = t.join().unwrap().err().expect("refused");
        assert!(e.to_string().contains("no client certificate"), "{e}");
        if let Ok(c) = c {
            let mut b = [0u8; 8];
            assert!(c.read_some(&mut b, secs(5)).is_err());
        }
    }

    /// A plaintext peer on either side fails the handshake at once, and a silent one at the
    /// deadline, never later.
    #[test]
    fn a_plaintext_or_silent_peer_fails_the_handshake_in_bounded_time() {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), &[]).unwrap();
        let server = ServerTls::load(d.path()).unwrap();
        let client = ClientTls::load(d.path(), "localhost").unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // A plaintext source talking to a TLS destination.
        let mut plain = TcpStream::connect(addr).unwrap();
        plain
            .write_all(&[0x52, 0x44, 0x4d, 0x47, 0, 1, 0, 0])
            .unwrap();
        let (s, _) = l.accept().unwrap();
        let e = TlsStream::server(s, &server, secs(5).unwrap())
            .err()
            .unwrap();
        assert!(e.to_string().contains("does not speak TLS"), "{e}");
        // A TLS source talking to a plaintext destination that answers with its own bytes.
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(&[0x52, 0x44, 0x4d, 0x47, 0, 2, 0, 0]).unwrap();
            std::thread::sleep(Duration::from_millis(500));
            let (silent, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_secs(2));
            drop(silent);
        });
        let e = TlsStream::client(TcpStream::connect(addr).unwrap(), &client, secs(5).unwrap())
            .err()
            .unwrap();
        assert!(e.to_string().contains("does not speak TLS"), "{e}");
        // A destination that accepts and says nothing: the handshake ends at its deadline.
        let started = Instant::now();
        let e = TlsStream::client(
            TcpStream::connect(addr).unwrap(),
            &client,
            Instant::now() + Duration::from_millis(300),
        )
        .err()
        .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(started.elapsed() < Duration::from_millis(1500));
        t.join().unwrap();
    }

    /// A record changed in flight fails its integrity check, and a connection cut inside a
    /// record is an error, not an orderly end.
    #[test]
    fn a_tampered_or_truncated_record_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), &[]).unwrap();
        let server = ServerTls::load(d.path()).unwrap();
        let client = ClientTls::load(d.path(), "localhost").unwrap();
        for tamper in [true, false] {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let srv = server.clone();
            let t = std::thread::spawn(move || {
                let (s, _) = l.accept().unwrap();
                let s = TlsStream::server(s, &srv, secs(5).unwrap()).unwrap();
                let mut b = [0u8; 64];
                s.read_some(&mut b, secs(5))
            });
            let mut sock = TcpStream::connect(addr).unwrap();
            let mut c =
                rustls::ClientConnection::new(client.config.clone(), client.name.clone()).unwrap();
            while c.is_handshaking() {
                c.complete_io(&mut sock).unwrap();
            }
            c.writer()
                .write_all(b"forty-two bytes of memory, or a header..")
                .unwrap();
            let mut sealed = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut sealed).unwrap();
            }
            if tamper {
                let last = sealed.len() - 1;
                sealed[last] ^= 1;
                sock.write_all(&sealed).unwrap();
            } else {
                sock.write_all(&sealed[..sealed.len() / 2]).unwrap();
                sock.shutdown(Shutdown::Write).unwrap();
            }
            let e = t.join().unwrap().expect_err("an error");
            if tamper {
                assert!(e.to_string().contains("integrity"), "{e}");
            } else {
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
            }
        }
    }

    /// spec: AUTH-1: two sessions between the same credentials export different bindings,
    /// so a HELLO MAC computed on one does not verify on another.
    #[test]
    fn auth_1_each_session_exports_its_own_binding() {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), &[]).unwrap();
        let (c1, s1) = pair(d.path(), "localhost");
        let (c2, s2) = pair(d.path(), "localhost");
        let (c1, s1, c2, s2) = (c1.unwrap(), s1.unwrap(), c2.unwrap(), s2.unwrap());
        assert_eq!(c1.binding(), s1.binding());
        assert_eq!(c2.binding(), s2.binding());
        assert_ne!(c1.binding(), c2.binding());
    }

    /// LIVE-2: closing a connection whose writer is blocked on a peer that reads nothing
    /// returns at once, and the writer's send then fails: no wait on the writer's locks.
    #[test]
    fn shutdown_does_not_wait_for_a_writer_blocked_on_a_silent_peer() {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), &[]).unwrap();
        let (c, s) = pair(d.path(), "localhost");
        let (c, _silent) = (Arc::new(c.unwrap()), s.unwrap());
        let w = c.clone();
        let writer = std::thread::spawn(move || {
            let chunk = vec![7u8; 1 << 20];
            // Far more than the socket buffers hold: blocks until the shutdown below.
            (0..256).try_for_each(|_| w.write_all(&chunk))
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(!writer.is_finished(), "the writer should be blocked by now");
        let closer = std::thread::spawn(move || c.shutdown(Shutdown::Both));
        let t = Instant::now();
        while !closer.is_finished() && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            closer.is_finished(),
            "shutdown waited on the blocked writer"
        );
        let r = writer.join().unwrap();
        assert!(
            r.is_err(),
            "the blocked send should fail once the socket is shut"
        );
    }
}
