"""What a topology update needs besides the methods: schedule, budgets, optimizer slots, block scores, q/k/v units."""
