"""Training drafts for a target: a corpus built locally, the target's features, draft heads."""
