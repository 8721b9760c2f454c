"""transport: replication over trio (TLS 1.3 mutual auth, the receiver's
server loop, the sender's shipping loop, pacing and backoff). The only
replication package that imports trio; see docs/replication.md."""
