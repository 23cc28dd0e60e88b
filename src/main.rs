#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "rekey", version, about = "Rotates AWS IAM user access keys stored in Kubernetes Secrets")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the IamKeyRotation CustomResourceDefinition as YAML (the source of crds/).
    Crd,
    /// Print the version.
    Version,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match rekey::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("rekey: cannot render the CRD: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Version => {
            println!("rekey {}", env!("CARGO_PKG_VERSION"));
            std::process::ExitCode::SUCCESS
        }
    }
}
