//! Compiles the gRPC protos with a vendored `protoc`, so a fresh machine needs no apt step.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let well_known = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("gateway_descriptor.bin"))
        // google.rpc.Status is tonic-types' (the same type tonic's rich errors use).
        .extern_path(".google.rpc.Status", "::tonic_types::pb::Status")
        // The admin answers print as JSON on the command line (`inspect`), field for field.
        .message_attribute(".feishu.reply.v1.ChatState", "#[derive(serde::Serialize)]")
        .message_attribute(".feishu.reply.v1.QuotaState", "#[derive(serde::Serialize)]")
        .message_attribute(".feishu.reply.v1.AppState", "#[derive(serde::Serialize)]")
        .message_attribute(".feishu.reply.v1.Budget", "#[derive(serde::Serialize)]")
        .message_attribute(
            ".feishu.reply.v1.CallerState",
            "#[derive(serde::Serialize)]",
        )
        .compile_protos(
            &[std::path::Path::new("proto/feishu/reply/v1/gateway.proto")],
            &[std::path::Path::new("proto"), well_known.as_path()],
        )?;
    // Between replicas only: not in the descriptor set the public port's reflection serves.
    tonic_prost_build::configure().compile_protos(
        &[std::path::Path::new(
            "proto/feishu/reply/peer/v1/peer.proto",
        )],
        &[std::path::Path::new("proto")],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
