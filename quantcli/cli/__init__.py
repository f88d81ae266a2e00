"""The command line: parsing, rich rendering and the one error boundary. Nothing else lives here."""
