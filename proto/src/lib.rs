//! Generated gRPC code: `indexer.v1` (and `orchestrator.v1` once defined).

/// `indexer.v1`: queries over the indexed state of watched wallets.
pub mod indexer {
    /// Version 1 of the indexer API.
    pub mod v1 {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("indexer.v1");

        /// The encoded descriptors of `indexer.v1`, for server reflection.
        pub const FILE_DESCRIPTOR_SET: &[u8] =
            tonic::include_file_descriptor_set!("indexer_descriptor");
    }
}
