"""One renderer per wire protocol: protocol-neutral choice events in, that protocol's bodies out."""
