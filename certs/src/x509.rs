//! The few X.509 facts Sluice needs beyond what rustls checks: validity period, subject and
//! subject alternative names.
//!
//! `x509-parser` is used because rustls (through webpki) verifies chains but does not expose a
//! certificate's notBefore/notAfter or its SAN list. We need both to reject an expired or
//! not-yet-valid certificate *with the date in the message*, to pick a certificate by SNI, to
//! apply `match_subject_alt_names`, and to show subject/SANs/expiry on the admin endpoint.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// A subject alternative name, as the SAN matchers of a validation context see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum San {
    Dns(String),
    Uri(String),
    Email(String),
    Ip(IpAddr),
}

impl std::fmt::Display for San {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            San::Dns(s) => write!(f, "DNS:{s}"),
            San::Uri(s) => write!(f, "URI:{s}"),
            San::Email(s) => write!(f, "email:{s}"),
            San::Ip(ip) => write!(f, "IP:{ip}"),
        }
    }
}

/// What we read out of one certificate.
#[derive(Debug, Clone)]
pub(crate) struct CertInfo {
    pub subject: String,
    /// The subject's first common name, used for SNI matching only when there are no DNS SANs
    /// (Envoy's rule).
    pub common_name: Option<String>,
    pub sans: Vec<San>,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<CertInfo, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let validity = cert.validity();
        let common_name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
        let mut sans = Vec::new();
        let ext = cert.subject_alternative_name().map_err(|e| format!("subjectAltName extension: {e}"))?;
        if let Some(ext) = ext {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(s) => sans.push(San::Dns(s.to_string())),
                    GeneralName::URI(s) => sans.push(San::Uri(s.to_string())),
                    GeneralName::RFC822Name(s) => sans.push(San::Email(s.to_string())),
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from_bytes(bytes) {
                            sans.push(San::Ip(ip));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(CertInfo {
            subject: cert.subject().to_string(),
            common_name,
            sans,
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        })
    }

    /// Lower-cased DNS names this certificate serves, for SNI selection.
    pub fn server_names(&self) -> Vec<String> {
        let dns: Vec<String> = self
            .sans
            .iter()
            .filter_map(|s| match s {
                San::Dns(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect();
        if dns.is_empty() { self.common_name.iter().map(|cn| cn.to_ascii_lowercase()).collect() } else { dns }
    }

    pub fn san_strings(&self) -> Vec<String> {
        self.sans.iter().map(ToString::to_string).collect()
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// Does certificate name `pattern` (possibly `*.example.com`) cover host `name`?
/// Both must already be lower-case. A wildcard covers exactly one label, as in RFC 6125 and
/// webpki; partial-label wildcards (`f*.example.com`) are not honoured.
pub(crate) fn dns_name_matches(pattern: &str, name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let pattern = pattern.strip_suffix('.').unwrap_or(pattern);
    match pattern.strip_prefix("*.") {
        Some(suffix) => match name.split_once('.') {
            Some((first, rest)) => !first.is_empty() && rest == suffix,
            None => false,
        },
        None => pattern == name,
    }
}

/// Seconds since the Unix epoch, now.
pub(crate) fn unix_now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Formats Unix seconds as RFC 3339 UTC (`2026-01-01T00:00:00Z`), the form used in errors and
/// on the admin endpoint.
pub(crate) fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Proleptic Gregorian date from days since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // d is in 1..=31 and m in 1..=12 by construction.
    (y, u32::try_from(m).unwrap_or(1), u32::try_from(d).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_600), "2026-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_825_599), "2000-02-29T11:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn wildcard_covers_one_label() {
        assert!(dns_name_matches("*.example.com", "a.example.com"));
        assert!(dns_name_matches("*.example.com", "a.example.com."));
        assert!(!dns_name_matches("*.example.com", "a.b.example.com"));
        assert!(!dns_name_matches("*.example.com", "example.com"));
        assert!(dns_name_matches("example.com", "example.com"));
        assert!(!dns_name_matches("example.com", "www.example.com"));
    }
}
