"""The adaptive screening service's logic; serve/app.py only wires it into Ray Serve."""
