//! `umbra demo`: TEMPORARY placeholder.

#[derive(clap::Args)]
pub struct DemoArgs {}

pub async fn run(_args: DemoArgs) -> anyhow::Result<()> {
    Ok(())
}
