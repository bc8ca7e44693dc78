//! Generated gRPC code: `indexer.v1` and `orchestrator.v1`.

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

/// `orchestrator.v1`: withdrawals.
pub mod orchestrator {
    /// Version 1 of the withdrawal API.
    pub mod v1 {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("orchestrator.v1");

        /// The encoded descriptors of `orchestrator.v1`, for server reflection.
        pub const FILE_DESCRIPTOR_SET: &[u8] =
            tonic::include_file_descriptor_set!("orchestrator_descriptor");
    }
}
