"""What talks to an endpoint: SDK helpers and the offline attack harness."""
