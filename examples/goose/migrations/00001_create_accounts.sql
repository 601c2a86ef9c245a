-- +goose Up
create table accounts (
    id      bigint primary key,
    owner   text not null,
    balance int not null default 0
);
insert into accounts select g, 'owner ' || g, g % 1000 from generate_series(1, 20000) g;

-- +goose Down
drop table accounts;
