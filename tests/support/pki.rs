//! A test PKI made with the `openssl` CLI: a CA, a server certificate it
//! signed (localhost and 127.0.0.1), a client certificate it signed, an
//! unrelated CA, and a server certificate for the same names signed by that
//! one (an impostor). More certificates are issued with [`TestPki::issue`].

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestPki {
    dir: tempfile::TempDir,
}

/// Extensions of a server certificate for localhost and 127.0.0.1.
pub const SERVER_EXT: &str =
    "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestPki {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("casf-pki-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let pki = TestPki { dir };
        for ca in ["ca", "wrong-ca"] {
            openssl(
                pki.dir.path(),
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=casf test {ca}"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                ],
            );
        }
        pki.issue("server", SERVER_EXT, "ca");
        pki.issue("client", "extendedKeyUsage=clientAuth\n", "ca");
        // Right names, wrong issuer: a server impersonated on the network.
        pki.issue("impostor", SERVER_EXT, "wrong-ca");
        pki
    }

    /// Issues `<name>.pem` and `<name>.key`, signed by `<ca>`, with the
    /// extensions `ext` (openssl extfile syntax).
    pub fn issue(&self, name: &str, ext: &str, ca: &str) {
        self.issue_for_days(name, ext, ca, 2);
    }

    /// [`TestPki::issue`], valid for `days`.
    pub fn issue_for_days(&self, name: &str, ext: &str, ca: &str, days: u32) {
        let d = self.dir.path();
        let days = days.to_string();
        std::fs::write(d.join(format!("{name}.ext")), ext).expect("extensions file");
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                &days,
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
        // redis-server, PostgreSQL and Envoy may run as another user.
        let status = Command::new("chmod")
            .arg("-R")
            .arg("a+rX")
            .arg(d)
            .status()
            .expect("chmod");
        assert!(status.success());
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn shown(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// The first certificate of `<name>.pem`, DER.
    pub fn der(&self, name: &str) -> Vec<u8> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_file(self.path(name))
            .expect("PEM certificate")
            .to_vec()
    }

    /// notAfter of `<name>.pem`, Unix seconds, as openssl reads it.
    pub fn not_after(&self, name: &str) -> i64 {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-enddate", "-dateopt", "iso_8601", "-in"])
            .arg(self.path(name))
            .output()
            .expect("run openssl");
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let date = text.trim().strip_prefix("notAfter=").expect("notAfter=");
        chrono::NaiveDateTime::parse_from_str(date, "%Y-%m-%d %H:%M:%SZ")
            .unwrap_or_else(|e| panic!("{date:?}: {e}"))
            .and_utc()
            .timestamp()
    }
}
