"""Configuration: every setting of every command as typed models, validated before Ray starts.

The bottom layer: imports nothing else from the package but its constants.
"""
