"""The catalog: a LocalAI-style index of pinned configs, validated offline, refreshed against the Hub, installed
with every file's sha256 checked; and the one place a model spec (file, entry name, folder, repo id) becomes a
config (`catalog.resolve`)."""
