"""`speccascade bench soak`: many clients for many minutes, with cancels, deadlines and replica kills."""
