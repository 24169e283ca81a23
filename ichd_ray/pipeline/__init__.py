"""The batch job on Ray: index headers, decode studies, score them on actor pools, commit tables; nightly."""
