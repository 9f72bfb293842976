//! `vmeshctl dev-cert`: a development certificate in a secrets directory, for the embedded
//! default (`vmesh-controller --secrets-dir`) on one machine.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

#[derive(Args, Debug)]
pub struct DevCertArgs {
    /// A DNS name the certificate is for (repeat for several).
    #[arg(long = "name", required = true)]
    pub names: Vec<String>,
    /// The secret's directory: `<secrets-dir>/<secret name>`, e.g.
    /// `/etc/vmesh/secrets/vmesh/tls/shop`. Gets the files `cert` and `key` (mode 0600).
    #[arg(long)]
    pub out: PathBuf,
    /// Where to write the CA certificate that signed it, for clients to trust.
    #[arg(long)]
    pub ca_out: PathBuf,
    /// How long the certificate is valid.
    #[arg(long, default_value_t = 30)]
    pub days: u32,
}

pub fn run(args: &DevCertArgs) -> anyhow::Result<ExitCode> {
    let dev = vmesh_tls::dev::dev_certificate(&args.names, args.days)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}", args.out.display()))?;
    write(&args.out.join("key"), &dev.key_pem, true)?;
    write(&args.out.join("cert"), &dev.cert_pem, false)?;
    write(&args.ca_out, &dev.ca_pem, false)?;
    eprintln!(
        "wrote a development certificate for {} (valid {} days) to {}, and its CA to {}: for demos and tests, not production",
        args.names.join(", "),
        args.days,
        args.out.display(),
        args.ca_out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes through a temporary file renamed into place, so a watcher never reads half a file.
fn write(path: &std::path::Path, text: &str, private: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .with_context(|| format!("{}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}", path.display()))?;
    Ok(())
}
