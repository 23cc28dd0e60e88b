//! Stamps the binary with the git commit it was built from (`REKEY_GIT_COMMIT`, read by
//! `rekey version` and the build-info metric). The image build has no `.git` (`.dockerignore`) and
//! may have no git: the commit is then "unknown", never a build failure.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=REKEY_GIT_COMMIT");
    // A commit given from outside (a CI that builds from a tarball) wins over what git says.
    let given = std::env::var("REKEY_GIT_COMMIT").ok().filter(|c| !c.is_empty());
    let commit = given.or_else(|| git(&["rev-parse", "--short=12", "HEAD"])).unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=REKEY_GIT_COMMIT={commit}");
    // Rebuild when HEAD moves: HEAD itself (a checkout), the branch it names (a commit) and
    // packed-refs. Only paths that exist: a missing one would rerun this script on every build.
    let (Some(git_dir), Some(common)) = (git(&["rev-parse", "--git-dir"]), git(&["rev-parse", "--git-common-dir"]))
    else {
        return;
    };
    let mut watched = vec![PathBuf::from(&git_dir).join("HEAD"), PathBuf::from(&common).join("packed-refs")];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(PathBuf::from(&common).join(branch));
    }
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
