"""Who may do what: TLS, identities, permissions, quotas, audit."""
