use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = vmesh_controller::args::Args::parse();
    vmesh_controller::run(args)
}
