//! An inference worker in Rust: asks the agent daemon for a model and lists the files it
//! can load from the directory it gets back.
//!
//!     cargo run -p cache-agent --example worker -- unix:///run/modelcache/agent.sock resnet50:int8

use cache_agent::daemon::client::ensure_model;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(daemon), Some(reference)) = (args.next(), args.next()) else {
        eprintln!("usage: worker DAEMON_ADDRESS REFERENCE");
        std::process::exit(2);
    };
    let dir = ensure_model(&daemon, &reference).await?;
    println!("{reference} is in {}", dir.display());
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        println!(
            "  {}\t{} bytes",
            entry.file_name().to_string_lossy(),
            entry.metadata()?.len()
        );
    }
    Ok(())
}
