"""Command line: argument parsing -> configs -> api calls. The only layer that prints."""
