"""Small-scale reproductions of prune-and-grow, GaP, nested levels and lottery tickets."""
