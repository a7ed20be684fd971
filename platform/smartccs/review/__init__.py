"""The cytologist's review workstation: a browser door onto a center's screened slides."""
