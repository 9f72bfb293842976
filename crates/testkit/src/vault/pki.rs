//! The PKI secrets engine at `pki/`: a root CA generated at start, roles that restrict the names
//! and URI SANs a certificate may carry, `sign/<role>` (a CSR), `issue/<role>` (a key made here)
//! and the CA's PEM without a token.

use std::collections::BTreeMap;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde_json::{json, Value};

/// A role: which names and URI SANs it signs, and for how long.
#[derive(Clone, Debug, Default)]
pub(crate) struct Role {
    allowed_domains: Vec<String>,
    allow_subdomains: bool,
    allow_bare_domains: bool,
    allow_any_name: bool,
    allowed_uri_sans: Vec<String>,
    require_cn: bool,
    ttl: Option<Duration>,
    max_ttl: Option<Duration>,
}

/// The longest certificate the mount signs when neither role nor request says (Vault's
/// default `max_lease_ttl`, 768 h).
const DEFAULT_TTL: Duration = Duration::from_secs(768 * 3600);

pub(crate) struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    pub roles: BTreeMap<String, Role>,
}

/// A list parameter: a JSON list of strings or a comma-separated string.
fn list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect(),
        Some(Value::String(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

fn duration(v: Option<&Value>) -> Result<Option<Duration>, String> {
    match v {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(Some(Duration::from_secs(n.as_u64().unwrap_or(0)))),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => crate::consul::parse_go_duration(s).map(Some),
        Some(_) => Err("a duration is a string like \"1h\" or a number of seconds".into()),
    }
}

/// `*` in a pattern matches any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            text.starts_with(head)
                && (0..=text.len() - head.len()).any(|i| {
                    text.is_char_boundary(head.len() + i) && glob(tail, &text[head.len() + i..])
                })
        }
    }
}

impl Role {
    pub fn from_body(body: &Value) -> Result<Role, String> {
        let flag = |k: &str| body.get(k).and_then(Value::as_bool).unwrap_or(false);
        Ok(Role {
            allowed_domains: list(body.get("allowed_domains")),
            allow_subdomains: flag("allow_subdomains"),
            allow_bare_domains: flag("allow_bare_domains"),
            allow_any_name: flag("allow_any_name"),
            allowed_uri_sans: list(body.get("allowed_uri_sans")),
            require_cn: body
                .get("require_cn")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            ttl: duration(body.get("ttl"))?,
            max_ttl: duration(body.get("max_ttl"))?,
        })
    }

    pub fn to_json(&self) -> Value {
        json!({
            "allowed_domains": self.allowed_domains,
            "allow_subdomains": self.allow_subdomains,
            "allow_bare_domains": self.allow_bare_domains,
            "allow_any_name": self.allow_any_name,
            "allowed_uri_sans": self.allowed_uri_sans,
            "require_cn": self.require_cn,
            "ttl": self.ttl.map_or(0, |d| d.as_secs()),
            "max_ttl": self.max_ttl.map_or(0, |d| d.as_secs()),
        })
    }

    fn allows_name(&self, name: &str) -> bool {
        self.allow_any_name
            || self.allowed_domains.iter().any(|d| {
                (self.allow_bare_domains && name == d)
                    || (self.allow_subdomains && name.ends_with(&format!(".{d}")))
            })
    }
}

impl Pki {
    pub fn new() -> Result<Pki, String> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // Each root its own name, as Vault's roots have (a rotation makes a second one), so that
        // verifiers that pick issuers by name find the right one.
        let id = crate::consul::new_uuid();
        dn.push(
            DnType::CommonName,
            format!("vault-emulator root {}", &id[..8]),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        let ca_pem = cert.pem();
        let issuer = Issuer::new(params, key);
        Ok(Pki {
            issuer,
            ca_pem,
            roles: BTreeMap::new(),
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Signs a certificate for `public_key` as `role` allows `body` (`common_name`,
    /// `alt_names`, `uri_sans`, `ttl`): Vault's `data` of `sign/<role>` and `issue/<role>`.
    fn sign(
        &self,
        role: &Role,
        body: &Value,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<Value, String> {
        let cn = body
            .get("common_name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if cn.is_empty() && role.require_cn {
            return Err("the common_name field is required, or must be provided in a CSR with \"use_csr_common_name\" set to true, unless \"require_cn\" is set to false".into());
        }
        let mut names: Vec<String> = list(body.get("alt_names"));
        if !cn.is_empty() {
            names.insert(0, cn.clone());
        }
        if let Some(bad) = names.iter().find(|n| !role.allows_name(n)) {
            return Err(format!("common name {bad} not allowed by this role"));
        }
        let uris = list(body.get("uri_sans"));
        if let Some(bad) = uris
            .iter()
            .find(|u| !role.allowed_uri_sans.iter().any(|p| glob(p, u)))
        {
            return Err(format!(
                "URI Subject Alternative Name {bad} not allowed by this role"
            ));
        }
        let max = role.max_ttl.unwrap_or(DEFAULT_TTL);
        let ttl = duration(body.get("ttl"))?
            .or(role.ttl)
            .unwrap_or(max)
            .min(max);

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if !cn.is_empty() {
            dn.push(DnType::CommonName, cn);
        }
        params.distinguished_name = dn;
        let mut sans = Vec::new();
        for n in &names {
            sans.push(SanType::DnsName(
                n.clone().try_into().map_err(|e| format!("{n}: {e}"))?,
            ));
        }
        for u in &uris {
            sans.push(SanType::URI(
                u.clone().try_into().map_err(|e| format!("{u}: {e}"))?,
            ));
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        // Like Vault's: the issuer's key identifier, for verifiers that hold several roots.
        params.use_authority_key_identifier_extension = true;
        let random =
            u64::from_str_radix(&crate::consul::new_uuid().replace('-', "")[..16], 16).unwrap_or(1);
        let mut serial: [u8; 8] = random.to_be_bytes();
        serial[0] &= 0x7f;
        serial[0] |= 0x01;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::seconds(30);
        let not_after = now + time::Duration::seconds(ttl.as_secs() as i64);
        params.not_after = not_after;
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| e.to_string())?;
        let serial_number = serial
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        Ok(json!({
            "certificate": cert.pem().trim_end(),
            "issuing_ca": self.ca_pem.trim_end(),
            "ca_chain": [self.ca_pem.trim_end()],
            "serial_number": serial_number,
            "expiration": not_after.unix_timestamp(),
        }))
    }

    /// `sign/<role>`: a certificate for the CSR in `body.csr` (PEM).
    pub fn sign_csr(&self, role: &Role, body: &Value) -> Result<Value, String> {
        let csr = body
            .get("csr")
            .and_then(Value::as_str)
            .ok_or("missing csr")?;
        let csr = CertificateSigningRequestParams::from_pem(csr)
            .map_err(|e| format!("certificate request could not be parsed: {e}"))?;
        self.sign(role, body, &csr.public_key)
    }

    /// `issue/<role>`: a key made here and its certificate.
    pub fn issue(&self, role: &Role, body: &Value) -> Result<Value, String> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let mut data = self.sign(role, body, &key)?;
        data["private_key"] = json!(key.serialize_pem().trim_end());
        data["private_key_type"] = json!("ec");
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_vault_role_patterns() {
        assert!(glob("spiffe://vmesh/*", "spiffe://vmesh/dc/dc1/agent/vm-1"));
        assert!(!glob("spiffe://vmesh/*", "spiffe://other/x"));
        assert!(glob(
            "spiffe://vmesh/dc/*/agent/*",
            "spiffe://vmesh/dc/dc1/agent/vm-1"
        ));
        assert!(glob("exact", "exact"));
    }
}
